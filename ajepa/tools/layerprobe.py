"""`ajepa bench layers BENCH`: the linear probe at every depth of the encoder, pretrained and untrained.

The pipeline's probe reads the encoder's last output, after its final LayerNorm. Where a pretrained
encoder probes no better than its random init, or below the time-averaged spectrum, this says where the
information went: each block's output (the residual stream, pooled as `linear.pooling` pools), the same
after the final norm, the patch embedding itself (depth 0), and the mean of the block outputs (a fixed
weighting of layers, as SUPERB weights them with learned ones). A LayerNorm divides every token by its own
spread, so what the last block kept of the clip's level shows as the gap between the last two rows.

Every row is the same probe as `ajepa linear` (logistic regression, its strength chosen on the validation
clips, the protocol's runs averaged), on embeddings held in memory: for the embedded benchmarks and other
sets of a few thousand clips, not for AudioSet.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ajepa import paths
from ajepa.config import Params
from ajepa.downstream.common import build_encoder
from ajepa.downstream.linear import evaluate_embeddings, fbank_batches
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.export import WEIGHTS
from ajepa.models import SpectrogramEncoder, pool_tokens


@torch.no_grad()
def layer_embeddings(encoder: SpectrogramEncoder, task, batch_size: int, pooling: str) -> dict[str, np.ndarray]:
    """{depth name: [clips, width]} for every clip of the task: the patch embedding ("0 patches"), each
    block's output ("k"), the last one through the final norm ("k + norm", what `ajepa linear` probes) and
    the mean of the block outputs ("mean of blocks"), each pooled with `pooling`."""
    encoder = encoder.eval()
    depth, out = len(encoder.blocks), {}

    def add(name: str, tokens: torch.Tensor) -> None:
        out.setdefault(name, []).append(pool_tokens(tokens, encoder.grid, pooling).float().numpy())

    for s in range(0, len(task.y), batch_size):
        x = encoder.embed(task.clips(range(s, min(s + batch_size, len(task.y)))))
        add("0 patches", x)
        total = torch.zeros_like(x)
        for i, blk in enumerate(encoder.blocks, 1):
            x = blk(x)
            total += x
            add(str(i), x)
        add(f"{depth} + norm", encoder.norm(x))
        add("mean of blocks", total / depth)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def probe_layers(params: Params, benchmark: str, encoder: str | None = None) -> dict:
    """The probe's score per depth for the exported `encoder` (default `downstream.encoder`) and its
    random init (`linear.seed`), and the fbank baseline, on `benchmark`'s prepared features."""
    params.recipe(benchmark)  # an unknown benchmark fails here, with the known ones listed
    cfg, which = params.linear, encoder or params.downstream.encoder
    path = paths.pretrained_encoder(which)
    if not (path / WEIGHTS).exists():
        raise AjepaError(f"{path / WEIGHTS}: no pretrained encoder (run `ajepa pretrain` first)")
    task = load_task(benchmark, paths.features_dir(benchmark))
    grid, start = tuple(task.store.stats["grid"]), time.perf_counter()
    rows: dict[str, dict] = {}
    for label, random_init in (("pretrained", False), ("random_init", True)):
        enc = build_encoder(path, grid, random_init=random_init, seed=cfg.seed)
        for name, emb in layer_embeddings(enc, task, cfg.embed_batch_size, cfg.pooling).items():
            rows.setdefault(name, {})[label] = evaluate_embeddings(task, emb, cfg)[task.metric]
    fbank = np.concatenate(list(fbank_batches(task)))
    return {"benchmark": benchmark, "metric": task.metric, "encoder": which, "weights": str(path / WEIGHTS),
            "pooling": cfg.pooling, "runs": len(task.splits), "layers": rows,
            "fbank_baseline": evaluate_embeddings(task, fbank, cfg)[task.metric],
            "seconds": round(time.perf_counter() - start, 1)}


def format_layers(r: dict) -> str:
    lines = [f"bench layers {r['benchmark']}: linear probe ({r['metric']}, mean of {r['runs']} run(s), pooling "
             f"{r['pooling']}) at each depth of the {r['encoder']} encoder ({r['weights']}) and of its random init",
             f"  {'depth':<16}{'pretrained':>12}{'random init':>13}{'difference':>12}"]
    for name, row in r["layers"].items():
        d = row["pretrained"] - row["random_init"]
        lines.append(f"  {name:<16}{row['pretrained']:>12.2f}{row['random_init']:>13.2f}{d:>+12.2f}")
    lines.append(f"  {'fbank (time-averaged log-mel)':<41}{r['fbank_baseline']:>.2f}")
    lines.append(f"  {r['seconds']} s")
    return "\n".join(lines)
