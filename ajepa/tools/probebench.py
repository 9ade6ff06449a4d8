"""`ajepa bench probe`: the linear probe's peak memory and time at several clip counts, on synthetic
embeddings written to disk as the stage writes them. Each size runs in a fresh process, since a process's
peak RSS (ru_maxrss) never goes down: the figures then show what the probe itself holds."""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ajepa.downstream.linear import fit_probe
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.downstream.rowfile import RowFile, write_rows

__all__ = ["bench_probe", "format_probe"]


def _one(clips: int, width: int, classes: int, block_mb: float, max_iter: int, device: str) -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, clips)
    centers = rng.normal(size=(classes, width)).astype(np.float32)
    split = np.where(np.arange(clips) % 10 < 8, "train", np.where(np.arange(clips) % 10 == 8, "val", "test"))
    index = pd.DataFrame({"clip_id": np.arange(clips).astype(str), "split": split})
    task = Task("bench", "splits", [str(c) for c in range(classes)], torch.empty(0), torch.as_tensor(y), index,
                eval_splits(index, "splits"), None)
    with tempfile.TemporaryDirectory(prefix="ajepa-bench-probe-") as tmp:
        batches = (centers[y[s:s + 1024]] + rng.normal(size=(len(y[s:s + 1024]), width)).astype(np.float32)
                   for s in range(0, clips, 1024))
        rows = RowFile(write_rows(Path(tmp) / "emb.npy", clips, batches, "synthetic embeddings"))
        start = time.perf_counter()
        r = fit_probe(task, rows, task.splits[0], [1e-3], max_iter, block_mb, torch.device(device))
        seconds = time.perf_counter() - start
    return {"clips": clips, "width": width, "embeddings_mb": round(clips * width * 4 / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "fit_seconds": round(seconds, 2), "accuracy": r["accuracy"]}


def bench_probe(clips: list[int], width: int = 1024, classes: int = 50, block_mb: float = 16, max_iter: int = 20,
                device: str = "auto") -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ctx = multiprocessing.get_context("spawn")
    runs = []
    for n in clips:
        with ctx.Pool(1) as pool:
            runs.append(pool.apply(_one, (n, width, classes, block_mb, max_iter, device)))
    return {"block_mb": block_mb, "max_iter": max_iter, "device": device, "runs": runs}


def format_probe(r: dict) -> str:
    lines = [f"bench probe: linear probe on synthetic embeddings read from disk, blocks of {r['block_mb']:g} MiB, "
             f"{r['max_iter']} L-BFGS iterations, one strength, on {r['device']}"]
    for x in r["runs"]:
        lines.append(f"  {x['clips']:>9,} clips x {x['width']} ({x['embeddings_mb']:>8.1f} MiB): peak RSS "
                     f"{x['peak_rss_mb']:8.1f} MiB, fit {x['fit_seconds']:7.2f} s, accuracy {x['accuracy']:.1f}")
    return "\n".join(lines)
