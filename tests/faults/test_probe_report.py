"""The probes and the report over damaged or failed results: a cut, key-less, failed or NaN metrics file is a
row of the report that says so (never a traceback, never a NaN in summary.json, which strict JSON readers
refuse); a bad attentive head count is one line before any work; NaN embeddings name where they came from."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import load_repo_params

from ajepa.downstream.linear import fit_probe
from ajepa.downstream.protocols import Task, eval_splits
from ajepa.downstream.rowfile import RowFile, write_rows
from ajepa.errors import AjepaError

PRETRAIN = {"steps": 4, "seconds": 1.0, "final_loss": 0.5, "samples_per_s": 10.0, "device": "cpu", "world_size": 1}


def _results(bench: str, stage: str, value: float = 61.0) -> dict:
    methods = ("linear", "linear_random_init") if stage == "linear" else ("finetune",)
    return {"benchmark": bench, "protocol": "splits", "metric": "accuracy", "classes": 10,
            **{m: {"accuracy": value, "runs": [{"split": "test", "accuracy": value}]} for m in methods}}


def _project(root, files: dict) -> None:
    """params.yaml (benchmarks synth and words) and the stage results `files` {relative path: text}."""
    (root / "params.yaml").write_text(yaml.safe_dump(load_repo_params(), sort_keys=False))
    everything = {"results/pretrain/metrics.json": json.dumps(PRETRAIN)}
    for bench in ("synth", "words"):
        for stage in ("linear", "finetune"):
            everything[f"results/{stage}/{bench}/metrics.json"] = json.dumps(_results(bench, stage))
    for rel, text in {**everything, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            continue
        path.write_text(text)


def _report(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ajepa.cli", "report"], cwd=root, capture_output=True, text=True,
                          timeout=300)


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_report_marks_cut_keyless_failed_missing_and_nan_results_and_is_still_written(tmp_path):
    cut = json.dumps(_results("synth", "linear"))[:40]
    failed = json.dumps({"benchmark": "words", "stage": "linear", "failed": "CUDA out of memory"})
    nan = json.dumps(_results("synth", "finetune", float("nan")))  # Python writes NaN, as json.dumps does
    _project(tmp_path, {"results/linear/synth/metrics.json": cut, "results/linear/words/metrics.json": failed,
                        "results/finetune/synth/metrics.json": nan,
                        "results/finetune/words/metrics.json": json.dumps({"benchmark": "words"})})
    r = _report(tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    summary = _strict((tmp_path / "results/summary.json").read_text())  # no NaN: strict readers accept it
    assert summary["synth"]["finetune"]["accuracy"] is None
    problems = summary["synth"]["problems"] + summary["words"]["problems"]
    assert any("results/linear/synth/metrics.json: unreadable" in p for p in problems)
    assert any("finetune.accuracy is nan (not a number): written as null" in p for p in problems)
    assert any("results/linear/words/metrics.json: linear failed: CUDA out of memory" in p for p in problems)
    assert any("results/finetune/words/metrics.json: no 'metric'" in p for p in problems)
    report = (tmp_path / "results/report.md").read_text()
    assert "| synth | accuracy | A-JEPA, fine-tuned | not a number (null in summary.json) | |" in report
    assert report.count("| PROBLEM |") == 4 and "linear failed: CUDA out of memory" in r.stdout


@pytest.mark.slow
def test_report_of_a_benchmark_whose_stages_never_ran_still_written(tmp_path):
    _project(tmp_path, {"results/linear/words/metrics.json": None, "results/finetune/words/metrics.json": None})
    r = _report(tmp_path)
    assert r.returncode == 0, r.stderr
    summary = _strict((tmp_path / "results/summary.json").read_text())
    assert summary["synth"]["linear"]["accuracy"] == 61.0 and "problems" not in summary["synth"]
    assert all("not found" in p and "failed or has not run" in p for p in summary["words"]["problems"])


@pytest.mark.slow
@pytest.mark.parametrize("text", ["{\"steps\": 4, \"secon", "{\"steps\": 4}", "[1, 2]"])
def test_report_over_a_damaged_pretraining_metrics_file_is_one_line(tmp_path, text):
    _project(tmp_path, {"results/pretrain/metrics.json": text})
    r = _report(tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "results/pretrain/metrics.json: " in line and ("unreadable" in line or "'final_loss'" in line)


@pytest.mark.slow
def test_attentive_heads_that_do_not_divide_the_width_is_one_line_before_any_work(tiny_export, tmp_path):
    """The smoke encoder is 32 wide; 3 heads cannot split it. The stage stops before embedding anything,
    and its metrics file records the failure for the report."""
    models, store = tiny_export
    shutil.copytree(models, tmp_path / "models" / "pretrain")
    params = load_repo_params()
    params["linear"]["attentive"].update(epochs=2, num_heads=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", "linear", "synth"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "linear.attentive.num_heads: 3 does not divide the width of the context encoder (32)" in line
    assert not list((tmp_path / "data").rglob("*.npy"))  # nothing embedded
    record = json.loads((tmp_path / "results/linear/synth/metrics.json").read_text())
    assert record["failed"].startswith("linear.attentive.num_heads: 3") and record["benchmark"] == "synth"


def _task(n: int = 120) -> Task:
    import pandas as pd
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n // 4))
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "split": split})
    y = torch.as_tensor(np.random.default_rng(0).integers(0, 3, n))
    return Task("hand", "splits", ["a", "b", "c"], torch.empty(0), y, index, eval_splits(index, "splits"), None)


def test_nan_embeddings_name_the_encoder_or_file_they_came_from(tmp_path):
    task = _task()
    emb = np.random.default_rng(1).normal(size=(len(task.y), 8)).astype(np.float32)
    emb[5, 3] = np.nan
    # written as computed: the encoder is named, nothing is left at the path
    with pytest.raises(AjepaError, match="the context encoder models/x.safetensors: 1 of the 60 clips of one batch give non-finite values"):
        write_rows(tmp_path / "e.npy", len(emb), (emb[s:s + 60] for s in range(0, len(emb), 60)),
                   "the context encoder models/x.safetensors")
    assert not list(tmp_path.iterdir())
    # a cache file damaged afterwards: the probe names the file instead of reporting NaN scores
    np.save(tmp_path / "cached.npy", emb)
    for block_mb in (512, 0.0001):  # in memory, and streamed in blocks of a few clips
        with pytest.raises(AjepaError, match=f"{tmp_path / 'cached.npy'}: the training clips' embeddings are not finite"):
            fit_probe(task, RowFile(tmp_path / "cached.npy"), task.splits[0], [0.1], block_mb=block_mb)
    emb[5, 3], emb[100, 0] = 0.0, np.inf  # a test clip only: its score
    np.save(tmp_path / "cached.npy", emb)
    with pytest.raises(AjepaError, match="cached.npy: the linear probe's scores are not finite"):
        fit_probe(task, RowFile(tmp_path / "cached.npy"), task.splits[0], [0.1])
