"""`ajepa linear BENCH`: frozen-encoder probes of the pretrained encoders and their baselines.

Rows (each the mean over the protocol's runs):
  linear                  logistic regression on the pooled tokens of the encoder `downstream.encoder` names
  linear_<other>_encoder  the same probe on the other pretrained encoder (context or target)
  linear_random_init      the same architecture untrained (`linear.seed`): what pretraining adds
  fbank_baseline          the time-averaged log-mel spectrogram: what the input alone gives
  attentive               V-JEPA's attentive probe on the tokens of `downstream.encoder`
  attentive_random_init   the attentive probe on the untrained encoder
The seconds each row took (with the embedding of the clips, unless data/embeddings/ held it) go to
logs/timing/linear-BENCH.json, apart from the metrics.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.config import Params
from ajepa.downstream.common import build_encoder, file_sha256, summary_lines
from ajepa.downstream.linear import (cached_embeddings, embed, embed_tokens, evaluate_embeddings, evaluate_tokens,
                                     fbank_embeddings)
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.export import WEIGHTS, read_export
from ajepa.lock import state_lock
from ajepa.stages.tracking import write_timing
from ajepa.train.checkpoint import config_hash

ENCODERS = ("target", "context")


class EmbeddingCache:
    """data/embeddings/BENCH/: the embeddings of one benchmark's clips, one .npy per encoder x pooling.
    Names carry what the embeddings depend on (encoder weights, or the untrained architecture and its
    seed; the features; the pooling), so a stale file is never read, and `prune` drops the others."""

    def __init__(self, task, benchmark: str):
        self.root, self.used = paths.embeddings_dir(benchmark), set()
        self.features = config_hash({k: task.store.stats[k] for k in ("mean", "std", "accepted", "grid")}
                                    | {"clips": task.index["clip_id"].tolist()})[:12]

    def get(self, name: str, compute) -> np.ndarray:
        name = f"{name}-{self.features}.npy"
        self.used.add(name)
        return cached_embeddings(self.root / name, compute)

    def prune(self) -> None:
        for f in self.root.glob("*.npy"):
            if f.name not in self.used:
                f.unlink()


def _timed(fn) -> dict:
    """fn()'s row, with the wall-clock seconds it took (embedding included, unless the cache had it) under
    the key "seconds", which _run moves to the timing file."""
    start = time.perf_counter()
    row = fn()
    return row | {"seconds": round(time.perf_counter() - start, 1)}


def _probe(task, cache: EmbeddingCache, cfg, label: str, make_encoder, with_tokens: bool) -> dict:
    """{"linear": ..., "attentive": ...} of one encoder (`label` names its weights for the cache)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    name = f"{task.name} {label.rsplit('-', 1)[0]}"  # the benchmark and the encoder, without its hash

    def pooled():
        return cache.get(f"{label}-{cfg.pooling}", lambda: embed(make_encoder(), task, cfg.embed_batch_size, device,
                                                                 cfg.pooling, desc=f"embed {name}"))

    def tokens():
        return cache.get(f"{label}-tokens", lambda: embed_tokens(make_encoder(), task, cfg.embed_batch_size, device,
                                                                 desc=f"tokens {name}"))

    out = {"linear": _timed(lambda: evaluate_embeddings(task, pooled(), cfg))}
    if with_tokens:
        out["attentive"] = _timed(lambda: evaluate_tokens(task, tokens(), cfg))
    return out


def probe_rows(task, cfg, chosen: str, encoder_paths: dict, cache: EmbeddingCache) -> dict:
    """Every row of the stage (see the module docstring), in report order."""
    grid, attentive, rows = tuple(task.store.stats["grid"]), cfg.attentive.epochs > 0, {}
    for which in (chosen, *(e for e in ENCODERS if e != chosen)):
        path = encoder_paths[which]
        r = _probe(task, cache, cfg, f"{which}-{file_sha256(path / WEIGHTS)[:12]}", lambda: build_encoder(path, grid),
                   attentive and which == chosen)
        rows["linear" if which == chosen else f"linear_{which}_encoder"] = r["linear"]
        if "attentive" in r:
            rows["attentive"] = r["attentive"]
    arch = {k: v for k, v in read_export(encoder_paths[chosen])[2]["architecture"].items() if k != "grid"}
    r = _probe(task, cache, cfg, f"random_init-{config_hash({'arch': arch, 'seed': cfg.seed})[:12]}",
               lambda: build_encoder(encoder_paths[chosen], grid, random_init=True, seed=cfg.seed), attentive)
    rows["linear_random_init"] = r["linear"]
    if "attentive" in r:
        rows["attentive_random_init"] = r["attentive"]
    rows["fbank_baseline"] = _timed(
        lambda: evaluate_embeddings(task, cache.get("fbank", lambda: fbank_embeddings(task, desc=f"fbank {task.name}")),
                                    cfg))
    return rows


def run(params: Params, benchmark: str) -> str:
    params.recipe(benchmark)  # an unknown benchmark fails here, with the known ones listed
    with state_lock(paths.embeddings_dir(benchmark), f"ajepa linear {benchmark}"):
        return _run(params, benchmark)


def _run(params: Params, benchmark: str) -> str:
    cfg, chosen = params.linear, params.downstream.encoder
    encoder_paths = {which: paths.pretrained_encoder(which) for which in ENCODERS}
    for path in encoder_paths.values():
        if not path.exists():
            raise AjepaError(f"{path}: no pretrained encoder (run `ajepa pretrain` first)")
    task = load_task(benchmark, paths.features_dir(benchmark))
    cache = EmbeddingCache(task, benchmark)
    rows = probe_rows(task, cfg, chosen, encoder_paths, cache)
    cache.prune()
    summary = summary_lines(rows, task.metric)  # with each row's seconds, before they leave the rows
    write_timing(f"linear-{benchmark}", {name: {"seconds": row.pop("seconds")} for name, row in rows.items()})
    out = paths.linear_results(benchmark)
    write_json(out / "metrics.json", {"benchmark": benchmark, "protocol": task.protocol, "metric": task.metric,
                                      "classes": len(task.classes), "encoder": chosen, "pooling": cfg.pooling,
                                      **rows})
    m = task.metric
    lines = [f"linear {benchmark}: {task.protocol} protocol, {len(task.splits)} run(s), {len(task.classes)} classes, "
             f"{chosen} encoder, pooling over {cfg.pooling}"]
    lines += summary
    lines.append(f"  -> {out / 'metrics.json'}")
    return "\n".join(lines)
