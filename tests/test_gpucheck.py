"""`ajepa gpu-check`: one JSON object; without CUDA a skip notice, or on request a miniature of every check."""

import json

import pytest
import torch

from ajepa.cli import main
from conftest import REPO


def test_without_cuda_it_says_so_and_passes(capsys, monkeypatch):
    monkeypatch.delenv("AJEPA_GPU_CHECK_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--params", str(REPO / "params.yaml"), "gpu-check"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cuda"] is False and "no CUDA device" in r["skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the miniature is the CPU path")
def test_the_miniature_runs_every_check_on_the_cpu(capsys, monkeypatch):
    """Paper-style step, pretraining with a falling loss, SIGKILL and resume to the same end, probes and
    fine-tuning, and the self-launched two-process run, at smoke size."""
    monkeypatch.chdir(REPO)  # the presets are found from the repository root
    monkeypatch.setenv("AJEPA_GPU_CHECK_CPU", "1")
    code = main(["gpu-check"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ok"] is True and r["miniature"] is True, r
    assert r["pretrain"]["steps"] == 30 and r["pretrain"]["last_loss"] < r["pretrain"]["first_loss"]
    resume = r["resume"]
    assert resume["killed"] and resume["resumed_from_step"] == resume["checkpoint_step"] >= 10
    assert resume["final_loss"] == resume["uninterrupted_final_loss"] and resume["max_weight_difference"] == 0.0
    assert r["ddp"]["world_size"] == r["ddp"]["processes"] == 2
    assert r["paper_step"]["peak_memory_gib"] is None and 0 < r["paper_step"]["mfu"] <= 1
    assert r["downstream"]["linear"].startswith("linear") and r["downstream"]["finetune"].startswith("finetune")
