"""Pretraining on a tiny synthetic feature store: learning, resume, faults, torchrun."""

import json
import math
import os
import random
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import pool_features, tiny_params

from ajepa.config import parse_params
from ajepa.data.store import FeatureStore
from ajepa.errors import AjepaError
from ajepa.export import read_export
from ajepa.models import AJEPA
from ajepa.stages.tracking import open_live
from ajepa.train.checkpoint import load_checkpoint
from ajepa.train.distributed import init_distributed
from ajepa.train.pretrain import PretrainPaths, pretrain


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A pool of 48 one-second synthetic clips as features (96 x 128, a 6 x 8 patch grid)."""
    root = tmp_path_factory.mktemp("features")
    out = pool_features(root, root / "data" / "features" / "synth", seed=3, clips=48)
    return out


def _params(**pretrain_overrides):
    p = tiny_params()
    p["pretrain"].update(pretrain_overrides)
    return parse_params(p)


def _paths(root):
    return PretrainPaths(encoders={"context": root / "context", "target": root / "target"},
                         state=root / "state", metrics=root / "metrics.json")


def _train(cfg, store_dir, out, **kw):
    """Train; the loss of every logged step (the smoke preset logs every step) as the tracker receives it."""
    losses, live = {}, open_live(out / "live")

    def open_log(start):
        log = live(start)

        def both(step, metrics):
            if "train/loss" in metrics:  # not at step 0, the curve's untrained model
                losses[step] = metrics["train/loss"]
            log(step, metrics)
        return both

    r = pretrain(cfg, FeatureStore(store_dir, ("pretrain",)), _paths(out), init_distributed(), open_log=open_log, **kw)
    return r, losses


@pytest.mark.slow
def test_loss_decreases(store_dir, tmp_path):
    cfg = _params().pretrain
    cfg = type(cfg)(**{**cfg.__dict__, "optim": type(cfg.optim)(**{**cfg.optim.__dict__, "epochs": 8, "lr": 2e-3}),
                       "masking": type(cfg.masking)(**{**cfg.masking.__dict__, "mode": "curriculum"})})
    r, losses = _train(cfg, store_dir, tmp_path)
    steps = sorted(losses)
    assert len(steps) == 8 * (48 // 8) == r.steps
    first, last = steps[:5], steps[-5:]
    assert sum(losses[s] for s in last) / 5 < 0.8 * sum(losses[s] for s in first) / 5
    # both encoders are exported; each loads into a plain encoder with its own config
    _, state, config = read_export(tmp_path / "context")
    assert config["architecture"]["grid"] == [6, 8] and config["architecture"]["embed_dim"] == 32
    assert config["encoder"] == "context"
    _, target, target_config = read_export(tmp_path / "target")
    assert target_config["architecture"] == config["architecture"] and target_config["encoder"] == "target"
    assert not all(torch.equal(state[k], target[k]) for k in state)
    assert 0.0 < r.tf_fraction < 1.0  # the curriculum mixes both mask modes
    logged = pd.read_csv(tmp_path / "live/plots/metrics/train/loss.tsv", sep="\t")
    assert list(logged["step"]) == steps
    # the no-context floor is logged beside the loss from the second step on (nothing is known at the first)
    floor = pd.read_csv(tmp_path / "live/plots/metrics/train/position_only_loss.tsv", sep="\t")
    assert len(floor) == len(steps) and floor["position_only_loss"].iloc[1:].notna().all()


def test_learning_curve_is_logged_at_probe_steps(store_dir, tmp_path):
    cfg = _params(probe={"every": 4, "encoders": ["target"], "l2": [0.1]}).pretrain
    seen = []

    def evaluate(step, model):
        assert not model.training
        seen.append(step)
        return {"probe/hand/target": float(step)}

    def evaluate_in_eval_mode(step, model):
        model.eval()
        return evaluate(step, model)

    r, _ = _train(cfg, store_dir, tmp_path, evaluate=evaluate_in_eval_mode)
    # step 0 first: the curve starts at the untrained model
    assert seen == [0, 4, 8, 12] and r.steps == 12 and r.probe_seconds >= 0
    curve = pd.read_csv(tmp_path / "live/plots/metrics/probe/hand/target.tsv", sep="\t")
    assert list(curve["step"]) == [0, 4, 8, 12] and list(curve["target"]) == [0.0, 4.0, 8.0, 12.0]



def test_the_learning_curve_probe_does_not_change_what_is_learned(store_dir, tmp_path):
    """A probe that draws from torch's, NumPy's and Python's global generators at every probe step
    (step 0 included) leaves the losses and the weights bit-identical to a run without a probe."""
    cfg = _params(probe={"every": 4, "encoders": ["context"], "l2": [0.1]}).pretrain

    def greedy_probe(step, model):
        model.eval()
        torch.rand(1000), np.random.rand(1000), random.random()
        return {"probe/greedy/context": 0.0}

    _, plain = _train(cfg, store_dir, tmp_path / "plain")
    _, probed = _train(cfg, store_dir, tmp_path / "probed", evaluate=greedy_probe)
    assert plain == probed and len(plain) == 12
    for which in ("context", "target"):
        a, b = read_export(tmp_path / f"plain/{which}")[1], read_export(tmp_path / f"probed/{which}")[1]
        assert all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_losses(store_dir, tmp_path):
    cfg = _params().pretrain
    _, straight = _train(cfg, store_dir, tmp_path / "a")
    r1, part1 = _train(cfg, store_dir, tmp_path / "b", stop_after=5)
    assert r1.steps == 5 and not (tmp_path / "b/context").exists()
    assert load_checkpoint(tmp_path / "b/state/checkpoint.pt")["step"] == 5
    r2, part2 = _train(cfg, store_dir, tmp_path / "b")
    assert r2.start_step == 5 and r2.steps == len(straight)
    assert {**part1, **part2} == straight  # bit-identical: same batches, masks, RNG and optimiser state
    for which in ("context", "target"):
        a = read_export(tmp_path / f"a/{which}")[1]
        b = read_export(tmp_path / f"b/{which}")[1]
        assert all(torch.equal(a[k], b[k]) for k in a)
        for name in ("config.json", "README.md"):  # the export records the run, not when it was made
            assert (tmp_path / f"a/{which}/{name}").read_bytes() == (tmp_path / f"b/{which}/{name}").read_bytes()
    logged = pd.read_csv(tmp_path / "b/live/plots/metrics/train/loss.tsv", sep="\t")
    assert list(logged["step"]) == sorted(straight)  # no duplicated rows after the resume
    # the clock covers the whole run: a rerun with nothing left to do reports the run's seconds and
    # throughput, not the zeros of its own empty loop
    r3, _ = _train(cfg, store_dir, tmp_path / "b")
    assert r3.start_step == r3.steps == len(straight) and r3.seconds >= r2.seconds > r1.seconds > 0
    assert r3.samples_per_s * r3.seconds == pytest.approx(len(straight) * cfg.optim.batch_size)


def test_accumulated_pretraining_run_equals_the_full_batch_run(store_dir, tmp_path):
    """Through the loop: the same parameters, the schedules and the step counter stepped once per
    optimiser step; and a run resumed with another micro-batch size is the same run."""
    full, full_losses = _train(_params().pretrain, store_dir, tmp_path / "full", stop_after=3)
    split, losses = _train(_params(micro_batch=3).pretrain, store_dir, tmp_path / "split", stop_after=3)
    assert full.steps == split.steps == 3
    a, b = (load_checkpoint(tmp_path / d / "state/checkpoint.pt") for d in ("full", "split"))
    assert a["step"] == b["step"] == 3
    assert a["lr"] == b["lr"] and a["wd"] == b["wd"] and a["momentum"] == b["momentum"]
    assert losses == pytest.approx(full_losses, rel=1e-6)
    for k, w in a["model"].items():
        v = b["model"][k]
        if k.endswith("attn.qkv.bias"):
            # the keys' bias does not change attention, so its gradient is 0 up to rounding, which Adam's
            # first steps (about lr * sign(gradient)) turn into whole steps: compare the queries' and values'
            d = w.shape[0] // 3
            w, v = torch.cat([w[:d], w[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        assert torch.allclose(w, v, atol=1e-6, rtol=1e-4), k
    resumed, _ = _train(_params(micro_batch=2).pretrain, store_dir, tmp_path / "split", stop_after=1)
    assert resumed.start_step == 3 and resumed.steps == 4


def test_changed_parameters_start_afresh(store_dir, tmp_path):
    _train(_params().pretrain, store_dir, tmp_path, stop_after=3)
    other = _params(seed=1).pretrain
    r, _ = _train(other, store_dir, tmp_path, stop_after=2)
    assert r.start_step == 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(store_dir, tmp_path, monkeypatch):
    forward = AJEPA.forward
    calls = {"n": 0}

    def poisoned(self, *a):
        calls["n"] += 1
        loss = forward(self, *a)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(AJEPA, "forward", poisoned)
    with pytest.raises(AjepaError) as e:
        _train(_params().pretrain, store_dir, tmp_path)
    msg = str(e.value)
    assert "non-finite loss (nan) at step 3" in msg and "(step 2) is kept" in msg and "\n" not in msg
    assert load_checkpoint(tmp_path / "state/checkpoint.pt")["step"] == 2


def test_missing_feature_store_is_one_line(tmp_path, capsys, monkeypatch):
    import yaml

    from ajepa.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    assert main(["pool", "synth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ajepa pool: error: data/features/synth: not a feature store") and "\n" not in err
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ajepa pretrain: error: data/pool/synth.json: not found (run `ajepa pool synth` first)")
    assert "\n" not in err


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_torchrun_two_processes_match_one(store_dir, tmp_path):
    """Two gloo processes with half the batch each = one process with the whole batch, and so do two
    processes that accumulate their half in micro-batches of 2 (DDP's no_sync on all but the last)."""
    import shutil
    import subprocess

    import yaml
    results = {}
    # a free port: a fixed one fails when another run (or a stale one) holds it
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:0", "-m", "ajepa.cli", "pretrain"]
    for name, cmd in {"single": [sys.executable, "-m", "ajepa.cli", "pretrain"], "ddp": torchrun,
                      "ddp_micro": torchrun}.items():
        root = tmp_path / name
        shutil.copytree(store_dir, root / "data/features/synth")
        p = tiny_params()
        p["pretrain"]["optim"]["epochs"] = 1
        p["pretrain"]["datasets"] = ["synth"]
        p["pretrain"]["micro_batch"] = 2 if name == "ddp_micro" else None
        p["distributed"]["processes"] = 1 if name == "single" else 2  # under torchrun: no processes of its own
        (root / "params.yaml").write_text(yaml.safe_dump(p))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "ajepa.cli", "pool", "synth"], cwd=root, check=True, env=env,
                       capture_output=True)
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = (json.loads((root / "results/pretrain/metrics.json").read_text()),
                         read_export(root / "models/pretrain/context")[1])
    m1, w1 = results["single"]
    for name in ("ddp", "ddp_micro"):
        m2, w2 = results[name]
        assert m2["world_size"] == 2 and m1["world_size"] == 1 and m1["steps"] == m2["steps"] == 6
        assert math.isclose(m1["final_loss"], m2["final_loss"], rel_tol=1e-4), name
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), (name, k)
