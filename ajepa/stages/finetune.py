"""`ajepa finetune BENCH`: fine-tune the pretrained encoder (and, as a baseline, the same architecture
from random init) on every run of the benchmark's protocol; resumable run by run, epoch by epoch."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from ajepa import paths
from ajepa.atomic import write_csv, write_json
from ajepa.config import Params
from ajepa.device import pick_device
from ajepa.downstream.common import build_encoder, file_sha256, summarize, summary_lines
from ajepa.downstream.finetune import finetune_run, result_dict
from ajepa.downstream.metrics import multilabel_metrics, secondary
from ajepa.downstream.protocols import load_task
from ajepa.errors import AjepaError
from ajepa.export import WEIGHTS
from ajepa.lock import state_lock
from ajepa.stages.tracking import open_live, write_timing
from ajepa.train.checkpoint import config_hash
from ajepa.train.compute import without_compute_keys

INITS = {"pretrained": "finetune", "random_init": "finetune_random_init"}


def run(params: Params, benchmark: str) -> str:
    params.recipe(benchmark)  # an unknown benchmark fails here, before a state folder is made for it
    device = pick_device(params.distributed.device)  # no usable GPU for `cuda`: one line, before any work
    with state_lock(paths.finetune_state_dir(benchmark), f"ajepa finetune {benchmark}"):
        return _run(params, benchmark, device)


def _run(params: Params, benchmark: str, device: torch.device) -> str:
    cfg = params.recipe(benchmark)
    encoder_path = paths.pretrained_encoder(params.downstream.encoder)
    if not encoder_path.exists():
        raise AjepaError(f"{encoder_path}: no pretrained encoder (run `ajepa pretrain` first)")
    task = load_task(benchmark, paths.features_dir(benchmark))
    if cfg.loss == "ce" and task.multi_label:
        raise AjepaError(f"params.yaml: finetune.{benchmark}.loss = ce: {benchmark} is multi-label; use bce")
    state_dir, out = paths.finetune_state_dir(benchmark), paths.finetune_results(benchmark)
    state_dir.mkdir(parents=True, exist_ok=True)
    base_hash = {"finetune": without_compute_keys(asdict(cfg)), "encoder": file_sha256(encoder_path / WEIGHTS),
                 "features": {k: task.store.stats[k] for k in ("mean", "std", "accepted", "grid")},
                 "clips": len(task.index), "device": device.type}
    inits = ["pretrained"] + (["random_init"] if cfg.random_init_baseline else [])
    splits = task.splits[:cfg.runs] if cfg.runs else task.splits  # the first `runs` of the protocol
    results = {init: [_finetune(params, benchmark, task, init, split, device, base_hash) for split in splits]
               for init in inits}
    _drop_stale_curves(out / "live", {f"{i}-{s.name}" for i in inits for s in splits})
    rows = _write_results(benchmark, task, results, out)
    lines = [f"finetune {benchmark}: {task.protocol} protocol, {len(splits)} of {len(task.splits)} run(s) per init, "
             f"{len(task.classes)} classes"]
    lines += summary_lines(rows, task.metric)
    lines.append(f"  -> {out / 'metrics.json'}, {out / 'predictions.csv'}, confusion.csv and per_class_ap.csv")
    return "\n".join(lines)


def _finetune(params: Params, benchmark: str, task, init: str, split, device: torch.device, base_hash: dict) -> dict:
    """One run's record: the one a finished run left, or the run (resumed where it stopped)."""
    cfg, state_dir = params.recipe(benchmark), paths.finetune_state_dir(benchmark)
    name = f"{init}-{split.name}"
    run_hash = config_hash({**base_hash, "run": name})
    done = state_dir / f"{name}.json"
    if done.exists() and json.loads(done.read_text()).get("run_hash") == run_hash:
        return json.loads(done.read_text())
    encoder_path = paths.pretrained_encoder(params.downstream.encoder)
    encoder = build_encoder(encoder_path, tuple(task.store.stats["grid"]), random_init=init == "random_init",
                            seed=cfg.seed, drop_path=cfg.drop_path)
    r = finetune_run(task, split, encoder, cfg, name, device, state_dir / f"{name}.pt", run_hash,
                     open_log=open_live(paths.finetune_results(benchmark) / "live" / name))
    record = {"run_hash": run_hash, **result_dict(r)}
    write_json(done, record)
    (state_dir / f"{name}.pt").unlink(missing_ok=True)  # the record is the finished run
    return record


def _write_results(benchmark: str, task, results: dict[str, list], out) -> dict:
    """metrics.json, predictions.csv and the plot tables; the metric rows by init."""
    m = task.metric
    rows = {}
    for init, records in results.items():
        runs = [{"split": r["name"].split("-", 1)[1], m: round(float(r["test"][m]), 2),
                 **secondary(r["test"]), "best_epoch": r["best_epoch"],
                 f"val_{m}": round(float(r["val_score"]), 2)} for r in records]
        rows[INITS[init]] = summarize(runs, m)
    write_timing(f"finetune-{benchmark}", {r["name"]: {"seconds": round(r["seconds"], 1)}
                                           for records in results.values() for r in records})
    write_json(out / "metrics.json", {"benchmark": benchmark, "protocol": task.protocol, "metric": m,
                                      "classes": len(task.classes), **rows})
    write_csv(out / "predictions.csv", _predictions(task, results))
    for name, table in plot_tables(task, results["pretrained"]).items():
        write_csv(out / name, table)
    return rows


def plot_tables(task, records: list[dict]) -> dict[str, pd.DataFrame]:
    """What `dvc plots` draws of the fine-tuned encoder, over the test clips of every run (dvc.yaml):
    confusion.csv, one (actual, predicted) row per clip for DVC's confusion template (single-label sets;
    header only for multi-label ones), and per_class_ap.csv, AP per class (one class against the rest
    for a single-label set; mean over runs; classes without a test positive left out), best first."""
    pairs = pd.DataFrame(columns=["actual", "predicted"])
    if task.multi_label:
        per_run = [r["test"]["per_class_ap"] for r in records]
    else:
        pairs = pd.DataFrame([{"actual": task.classes[int(task.y[pos])], "predicted": task.classes[int(np.argmax(s))]}
                              for r in records for pos, s in zip(r["test_positions"], r["test_scores"])],
                             columns=["actual", "predicted"])
        one_hot = np.eye(len(task.classes), dtype=np.int64)[np.asarray(task.y)]
        per_run = [multilabel_metrics(one_hot[r["test_positions"]], r["test_scores"])["per_class_ap"] for r in records]
    runs = np.array([[np.nan if v is None else v for v in r] for r in per_run], float).reshape(-1, len(task.classes))
    counts = np.isfinite(runs).sum(axis=0)
    mean = np.where(counts > 0, np.nansum(runs, axis=0) / np.maximum(counts, 1), np.nan)
    keep = [k for k in np.argsort(-np.nan_to_num(mean, nan=-1.0), kind="stable") if np.isfinite(mean[k])]
    ap = pd.DataFrame({"class": [task.classes[k] for k in keep], "ap": [round(float(mean[k]), 3) for k in keep]},
                      columns=["class", "ap"])
    return {"confusion.csv": pairs, "per_class_ap.csv": ap}


def _predictions(task, results: dict[str, list]) -> pd.DataFrame:
    rows = []
    for init, records in results.items():
        for r in records:
            for pos, scores in zip(r["test_positions"], r["test_scores"]):
                top = sorted(range(len(scores)), key=lambda k: -scores[k])
                rows.append({"clip_id": task.index["clip_id"].iloc[pos], "run": r["name"], "init": init,
                             "labels": task.index["labels"].iloc[pos], "predicted": task.classes[top[0]],
                             "score": round(scores[top[0]], 5)})
    return pd.DataFrame(rows)


def _drop_stale_curves(live_root, names: set) -> None:
    """Delete the curves of runs this configuration no longer has (e.g. fold 2 after `runs` went 2 -> 1),
    so `dvc plots` and the committed results show only the runs behind metrics.json."""
    if live_root.is_dir():
        for d in live_root.iterdir():
            if d.is_dir() and d.name not in names:
                shutil.rmtree(d)
