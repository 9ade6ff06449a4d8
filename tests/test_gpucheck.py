"""`ajepa gpu-check`: one JSON object; without a usable GPU one line and a non-zero exit; `--cpu` a miniature
of every check on the CPU."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from ajepa.cli import main
from ajepa.tools.gpucheck import check_spread, guarded


def test_without_cuda_it_stops_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("AJEPA_GPU_CHECK_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--params", str(REPO / "params.yaml"), "gpu-check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("ajepa gpu-check: error: no usable GPU: ") and "--cpu runs a miniature" in err


def test_a_check_that_cannot_run_is_skipped_never_ok(tmp_path, monkeypatch):
    """One visible GPU: the DDP check has nothing to spread over, and says so."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = {}
    assert guarded(r, "ddp", lambda: check_spread(tmp_path, {}, {}, tmp_path, cuda=True, torchrun=False)) is None
    assert r["ddp"]["status"] == "skipped" and r["ddp"]["ok"] is None and "one visible GPU" in r["ddp"]["skipped"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("limits, remedy", [("512:8192", "ulimit -n"), ("512:1024", "the hard limit 1024 is below")])
def test_an_open_file_limit_below_the_paper_store_fails_with_its_remedy(tmp_path, limits, remedy):
    """The store's descriptors are measured on a real store (three shards), under a lowered limit."""
    import numpy as np
    import pandas as pd
    import soundfile as sf

    from ajepa.data.frontend import FrontEnd
    from ajepa.data.store import extract_features
    wavs = []
    for i in range(6):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, np.random.default_rng(i).standard_normal(16000).astype("float32") * 0.1, 16000)
        wavs.append(str(path))
    manifest = pd.DataFrame({"clip_id": [f"c{i}" for i in range(6)], "path": wavs, "labels": "", "fold": 0,
                             "split": "train"})
    extract_features(manifest, tmp_path / "store", FrontEnd(), target_length=96, shard_clips=2, num_workers=0,
                     max_reject_fraction=0.0, progress=False, extra_stats={"grid": [6, 8], "patch_size": 16})
    code = ("import json; from ajepa.tools.gpucheck import check_open_files; "
            f"print(json.dumps(check_open_files({str(REPO / 'params.yaml')!r}, __import__('pathlib').Path("
            f"{str(tmp_path / 'store')!r}))))")
    out = subprocess.run(["prlimit", f"--nofile={limits}", sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout
    r = json.loads(out)
    assert r["ok"] is False and r["soft_limit"] == 512 and r["descriptors_per_shard"] == 1.0
    assert r["need"] > 512 and remedy in r["remedy"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the miniature is the CPU path")
def test_the_miniature_runs_every_check_on_the_cpu(capsys, monkeypatch):
    """Paper-style step with its memory against the machine's, micro_batch auto, the loader against the
    step's rate, the open-file limit, pretraining with a falling loss, SIGKILL and resume to the same end,
    probes and fine-tuning, and two gloo processes started by `ajepa pretrain` and by torchrun."""
    monkeypatch.chdir(REPO)  # the presets are found from the repository root
    code = main(["gpu-check", "--cpu"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert code == 0 and r["ok"] is True and r["miniature"] is True and r["failed"] == r["skipped"] == [], r
    assert err.startswith("gpu-check on the CPU miniature: 9 of 9 checks ok")
    assert all(r[k]["status"] == "ok" and r[k]["ok"] is True for k in ("paper_step", "micro_batch", "data_path",
                                                                       "open_files", "ddp", "torchrun"))
    assert r["pretrain"]["steps"] == 30 and r["pretrain"]["last_loss"] < r["pretrain"]["first_loss"]
    resume = r["resume"]
    assert resume["killed"] and resume["resumed_from_step"] == resume["checkpoint_step"] >= 10
    assert resume["final_loss"] == resume["uninterrupted_final_loss"] and resume["max_weight_difference"] == 0.0
    for name in ("ddp", "torchrun"):
        assert r[name]["world_size"] == r[name]["processes"] == 2 and r[name]["backend"] == "gloo"
    step = r["paper_step"]
    assert 0 < step["mfu"] <= 1 and 0 <= step["memory_fraction"] <= 0.9 and step["memory_capacity_gib"] > 0
    assert r["micro_batch"]["micro_batch"] == r["micro_batch"]["per_process_batch"]  # auto on a CPU: all of it
    assert r["data_path"]["need_clips_per_s"] == step["samples_per_s"] <= r["data_path"]["supply_clips_per_s"]
    assert r["downstream"]["linear"].startswith("linear") and r["downstream"]["finetune"].startswith("finetune")
