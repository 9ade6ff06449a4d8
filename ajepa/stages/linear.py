"""`ajepa linear BENCH`: frozen-encoder probes of the pretrained encoders and their baselines.

Rows (each the mean over the protocol's runs):
  linear                  logistic regression on the pooled tokens of the encoder `downstream.encoder` names
  linear_<other>_encoder  the same probe on the other pretrained encoder (context or target)
  linear_random_init      the same architecture untrained (`linear.seed`): what pretraining adds
  fbank_baseline          the time-averaged log-mel spectrogram: what the input alone gives
  attentive               V-JEPA's attentive probe on the tokens of `downstream.encoder`
  attentive_random_init   the attentive probe on the untrained encoder
The seconds each row took (with the embedding of the clips, unless data/embeddings/ held it) go to
logs/timing/linear-BENCH.json, apart from the metrics. Embeddings go to disk batch by batch and the
probes read them back in blocks (ajepa.downstream.linear), so memory is bounded by `linear.block_mb`,
not by the clip count. A failure leaves a metrics file that says so (ajepa.stages.outcome), for the
report's row.
"""

from __future__ import annotations

import time

import torch

from ajepa import paths
from ajepa.atomic import write_json
from ajepa.choices import Encoder, names
from ajepa.config import Params
from ajepa.device import pick_device
from ajepa.downstream.common import build_encoder, file_sha256, summary_lines
from ajepa.downstream.linear import (
    cached_embeddings,
    evaluate_embeddings,
    evaluate_tokens,
    fbank_batches,
    pooled_batches,
    token_batches,
)
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.export import WEIGHTS, read_config
from ajepa.lock import state_lock
from ajepa.stages.outcome import recorded_failure
from ajepa.stages.tracking import write_timing
from ajepa.train.checkpoint import config_hash


class EmbeddingCache:
    """data/embeddings/BENCH/: the embeddings of one benchmark's clips, one .npy per encoder x pooling.
    Names carry what the embeddings depend on (encoder weights, or the untrained architecture and its
    seed; the features; the pooling), so a stale file is never read, and `prune` drops the others."""

    def __init__(self, task, benchmark: str):
        self.root, self.used, self.clips = paths.embeddings_dir(benchmark), set(), len(task.y)
        self.features = config_hash({k: task.store.stats[k] for k in ("mean", "std", "accepted", "grid")}
                                    | {"clips": task.index["clip_id"].tolist()})[:12]

    def get(self, name: str, batches, what: str):
        """The rows (on disk) of data/embeddings/BENCH/NAME-FEATURES.npy, written from batches() if missing."""
        name = f"{name}-{self.features}.npy"
        self.used.add(name)
        return cached_embeddings(self.root / name, self.clips, batches, what)

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


def _probe(task, cache: EmbeddingCache, cfg, label: str, make_encoder, with_tokens: bool, source: str,
           device: torch.device) -> dict:
    """{"linear": ..., "attentive": ...} of one encoder (`label` names its weights for the cache, `source`
    for the user: its weights file, or the untrained architecture)."""
    name = f"{task.name} {label.rsplit('-', 1)[0]}"  # the benchmark and the encoder, without its hash

    what = f"{source}, on the clips of {task.name}"

    def pooled():
        return cache.get(f"{label}-{cfg.pooling}", lambda: pooled_batches(
            make_encoder(), task, cfg.embed_batch_size, device, cfg.pooling, desc=f"embed {name}"), what)

    def tokens():
        return cache.get(f"{label}-tokens", lambda: token_batches(
            make_encoder(), task, cfg.embed_batch_size, device, desc=f"tokens {name}"), what)

    out = {"linear": _timed(lambda: evaluate_embeddings(task, pooled(), cfg, device))}
    if with_tokens:
        out["attentive"] = _timed(lambda: evaluate_tokens(task, tokens(), cfg))
    return out


def probe_rows(task, cfg, chosen: str, encoder_paths: dict, cache: EmbeddingCache, device: torch.device) -> dict:
    """Every row of the stage (see the module docstring), in report order, embedding on `device`."""
    grid, attentive, rows = tuple(task.store.stats["grid"]), cfg.attentive.epochs > 0, {}
    for which in (chosen, *(e for e in names(Encoder) if e != chosen)):
        path = encoder_paths[which]
        r = _probe(task, cache, cfg, f"{which}-{file_sha256(path / WEIGHTS)[:12]}", lambda path=path: build_encoder(path, grid),
                   attentive and which == chosen, f"the {which} encoder {path / WEIGHTS}", device)
        rows["linear" if which == chosen else f"linear_{which}_encoder"] = r["linear"]
        if "attentive" in r:
            rows["attentive"] = r["attentive"]
    arch = {k: v for k, v in read_config(encoder_paths[chosen])[1]["architecture"].items() if k != "grid"}
    r = _probe(task, cache, cfg, f"random_init-{config_hash({'arch': arch, 'seed': cfg.seed})[:12]}",
               lambda: build_encoder(encoder_paths[chosen], grid, random_init=True, seed=cfg.seed), attentive,
               f"the untrained encoder (seed {cfg.seed})", device)
    rows["linear_random_init"] = r["linear"]
    if "attentive" in r:
        rows["attentive_random_init"] = r["attentive"]
    rows["fbank_baseline"] = _timed(lambda: evaluate_embeddings(task, cache.get(
        "fbank", lambda: fbank_batches(task, desc=f"fbank {task.name}"), f"the fbank features of {task.name}"), cfg))
    return rows


def run(params: Params, benchmark: str) -> str:
    params.recipe(benchmark)  # an unknown benchmark fails here, with the known ones listed
    device = pick_device(params.distributed.device)  # no usable GPU for `cuda`: one line, before any work
    with state_lock(paths.embeddings_dir(benchmark), f"ajepa linear {benchmark}"), \
            recorded_failure(paths.linear_results(benchmark) / "metrics.json", benchmark, "linear"):
        return _run(params, benchmark, device)


def _run(params: Params, benchmark: str, device: torch.device) -> str:
    cfg, chosen = params.linear, params.downstream.encoder
    encoder_paths = {which: paths.pretrained_encoder(which) for which in names(Encoder)}
    for path in encoder_paths.values():
        if not path.exists():
            raise AjepaError(f"{path}: no pretrained encoder (run `ajepa pretrain` first)")
    width = read_config(encoder_paths[chosen])[1]["architecture"]["embed_dim"]
    if cfg.attentive.epochs and width % cfg.attentive.num_heads:
        raise AjepaError(f"linear.attentive.num_heads: {cfg.attentive.num_heads} does not divide the width of the "
                         f"{chosen} encoder ({width}): use one of its divisors")
    task = load_task(benchmark, paths.features_dir(benchmark))
    cache = EmbeddingCache(task, benchmark)
    rows = probe_rows(task, cfg, chosen, encoder_paths, cache, device)
    cache.prune()
    summary = summary_lines(rows, task.metric)  # with each row's seconds, before they leave the rows
    write_timing(f"linear-{benchmark}", {name: {"seconds": row.pop("seconds")} for name, row in rows.items()})
    out = paths.linear_results(benchmark)
    write_json(out / "metrics.json", {"benchmark": benchmark, "protocol": task.protocol, "metric": task.metric,
                                      "classes": len(task.classes), "encoder": chosen, "pooling": cfg.pooling,
                                      **rows})
    lines = [f"linear {benchmark}: {task.protocol} protocol, {len(task.splits)} run(s), {len(task.classes)} classes, "
             f"{chosen} encoder, pooling over {cfg.pooling}"]
    lines += summary
    lines.append(f"  -> {out / 'metrics.json'}")
    return "\n".join(lines)
