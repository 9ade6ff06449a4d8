"""`ajepa linear BENCH`: frozen-encoder linear evaluation of the pretrained encoder and its baselines."""

from __future__ import annotations

import json

import torch

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.config import Params
from ajepa.downstream.common import build_encoder, file_sha256
from ajepa.downstream.linear import cached_embeddings, embed, evaluate_embeddings, fbank_embeddings
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.train.checkpoint import config_hash


def run(params: Params, benchmark: str) -> str:
    params.recipe(benchmark)  # an unknown benchmark fails here, with the known ones listed
    cfg = params.linear
    encoder_path = paths.pretrained_encoder()
    if not encoder_path.exists():
        raise AjepaError(f"{encoder_path}: no pretrained encoder (run `ajepa pretrain` first)")
    task = load_task(benchmark, paths.features_dir(benchmark))
    grid = tuple(task.store.stats["grid"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # embeddings depend on the encoder weights, the features and the architecture's random init
    # seed; the cache file name carries all three, so stale embeddings are never read
    features_key = config_hash({k: task.store.stats[k] for k in ("mean", "std", "accepted", "grid")}
                               | {"clips": task.index["clip_id"].tolist()})[:12]
    encoder_key = file_sha256(encoder_path)[:12]
    cache = paths.embeddings_dir(benchmark)

    def encoder_embeddings(random_init: bool):
        enc = build_encoder(encoder_path, grid, random_init=random_init, seed=cfg.seed)
        return embed(enc, task, cfg.embed_batch_size, device)

    rows = {}
    emb = cached_embeddings(cache / f"pretrained-{encoder_key}-{features_key}.npy", lambda: encoder_embeddings(False))
    rows["linear"] = evaluate_embeddings(task, emb, cfg)
    arch_key = config_hash({"arch": _arch(encoder_path), "seed": cfg.seed})[:12]
    emb = cached_embeddings(cache / f"random_init-{arch_key}-{features_key}.npy", lambda: encoder_embeddings(True))
    rows["linear_random_init"] = evaluate_embeddings(task, emb, cfg)
    emb = cached_embeddings(cache / f"fbank-{features_key}.npy", lambda: fbank_embeddings(task))
    rows["fbank_baseline"] = evaluate_embeddings(task, emb, cfg)
    _prune_cache(cache, keep={f"pretrained-{encoder_key}-{features_key}.npy",
                              f"random_init-{arch_key}-{features_key}.npy", f"fbank-{features_key}.npy"})

    out = paths.linear_results(benchmark)
    write_json(out / "metrics.json", {"benchmark": benchmark, "protocol": task.protocol, "metric": task.metric,
                                      "classes": len(task.classes), **rows})
    m = task.metric
    lines = [f"linear {benchmark}: {task.protocol} protocol, {len(task.splits)} run(s), {len(task.classes)} classes"]
    for name, r in rows.items():
        std = f" +- {r['std']:.2f}" if "std" in r else ""
        lines.append(f"  {name:20s} {m} {r[m]:6.2f}{std}")
    lines.append(f"  -> {out / 'metrics.json'}")
    return "\n".join(lines)


def _arch(encoder_path) -> dict:
    from ajepa.train.checkpoint import load_encoder_state
    return {k: v for k, v in load_encoder_state(encoder_path)[1].items() if k != "grid"}


def _prune_cache(cache, keep: set[str]) -> None:
    """Embeddings of earlier encoders or features are dead weight once replaced."""
    for f in cache.glob("*.npy"):
        if f.name not in keep:
            f.unlink()
