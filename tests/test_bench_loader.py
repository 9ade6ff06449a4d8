"""`ajepa bench loader`: clips/s of the pretraining loader per worker, and the workers 8 H100s need;
beside them, clips/s of fine-tuning's batches per worker."""

import json
import math

import pytest

from ajepa.cli import main
from ajepa.tools import bench


@pytest.mark.slow
def test_bench_loader_on_its_own_tiny_store(capsys):
    assert main(["bench", "loader", "--clips", "24", "--frames", "96", "--batch", "8", "--steps", "2",
                 "--workers", "1", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["store"] == "temporary" and r["clips"] == 24 and r["clip_shape"] == [96, 128] and r["grid"] == [6, 8]
    assert set(r["clips_per_s"]) == set(r["clips_per_s_per_worker"]) == {"1", "2"}
    assert all(v > 0 for v in r["clips_per_s"].values())
    assert abs(r["clips_per_s_per_worker"]["2"] - r["clips_per_s"]["2"] / 2) <= 0.1  # (rounded figures)
    # the plan's rate: 633 GFLOP per clip at 35% of 989 TFLOP/s, about 547 clips/s per H100
    assert r["plan_clips_per_s_per_gpu"] == round(bench.plan_clips_per_s_per_gpu(), 1) == 546.8
    slowest = min(r["clips_per_s_per_worker"].values())
    assert abs(r["workers_needed"] - math.ceil(r["plan_clips_per_s"] / slowest)) <= 1  # (rounded figures)
    assert r["workers_needed"] >= 1
    assert "docs/compute.md" in r["plan_source"]


@pytest.mark.slow
def test_bench_loader_text_names_the_workers_needed(capsys):
    assert main(["bench", "loader", "--clips", "16", "--frames", "96", "--batch", "8", "--steps", "1",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 worker(s):" in out and "loader workers on the node" in out and "8 H100s" in out
    assert "fine-tuning batches of 8 (synth's recipe" in out and out.count("1 worker(s):") == 2


def test_bench_loader_times_fine_tuning_batches_per_worker_count(capsys):
    assert main(["bench", "loader", "--clips", "24", "--frames", "96", "--batch", "8", "--steps", "2",
                 "--workers", "0", "2", "--benchmark", "words", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["finetune"]
    assert t["benchmark"] == "words" and t["batch"] == 8 and t["mixup"] == 0.0
    assert set(t["clips_per_s"]) == set(t["clips_per_s_per_worker"]) == {"0", "2"}
    assert all(v > 0 for v in t["clips_per_s"].values())
    assert t["clips_per_s_per_worker"]["0"] == t["clips_per_s"]["0"]  # in the training process: one reader
    assert abs(t["clips_per_s_per_worker"]["2"] - t["clips_per_s"]["2"] / 2) <= 0.1
    assert main(["bench", "loader", "--clips", "16", "--frames", "96", "--batch", "8", "--steps", "1",
                 "--workers", "1", "--benchmark", "nonesuch"]) == 2  # one line, not a traceback
    assert "unknown benchmark 'nonesuch'" in capsys.readouterr().err
