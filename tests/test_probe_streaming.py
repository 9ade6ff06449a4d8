"""The streamed linear probe (embeddings on disk, read and fitted in blocks) against the in-memory one, and
the row files it reads."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ajepa.downstream.linear import fit_probe, standardisation
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.downstream.rowfile import ArrayRows, RowFile, write_rows
from ajepa.errors import AjepaError


def _case(n=400, classes=4, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    emb = (rng.normal(size=(classes, dim))[y] * 0.8 + rng.normal(size=(n, dim)) + 3.0).astype(np.float32)
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": rng.choice(["train", "val", "test"], n)})
    task = Task("hand", "splits", [f"k{i}" for i in range(classes)], torch.empty(0), torch.as_tensor(y), index,
                eval_splits(index, "splits"), None)
    return task, emb


def test_rows_written_in_batches_read_back_by_position(tmp_path):
    _, emb = _case()
    path = write_rows(tmp_path / "e.npy", len(emb), (emb[s:s + 64] for s in range(0, len(emb), 64)), "test")
    assert np.array_equal(np.load(path), emb)  # a plain .npy
    rows = RowFile(path)
    picks = np.array([5, 6, 7, 300, 2, 3])  # runs and a jump back
    assert np.array_equal(rows.read(picks), emb[picks]) and rows.shape == emb.shape
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(AjepaError, match="e.npy: cut or damaged"):
        RowFile(path)


def test_streamed_statistics_and_fit_match_the_in_memory_ones(tmp_path):
    task, emb = _case()
    split = task.splits[0]
    np.save(tmp_path / "e.npy", emb)
    rows = RowFile(tmp_path / "e.npy")
    mean, std = standardisation(ArrayRows(emb), split.train, len(emb))
    s_mean, s_std = standardisation(rows, split.train, 7)  # blocks of 7 clips
    assert torch.allclose(mean, s_mean, atol=1e-5) and torch.allclose(std, s_std, atol=1e-5)
    memory = fit_probe(task, emb, split, [0.1, 0.01], max_iter=100)
    streamed = fit_probe(task, rows, split, [0.1, 0.01], max_iter=100, block_mb=24 * 4 * 60 / 2**20)  # 60 clips a block
    assert streamed == memory  # same optimum: same strength, same rounded scores


@pytest.mark.slow
def test_bench_probe_prints_peak_rss_and_seconds_per_size():
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", "bench", "probe", "--clips", "300", "900", "--width", "64",
                        "--block-mb", "0.05", "--max-iter", "3", "--device", "cpu", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [x["clips"] for x in runs] == [300, 900] and all(x["peak_rss_mb"] > 0 and x["fit_seconds"] > 0 for x in runs)
