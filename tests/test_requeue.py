"""Requeues keep the run: a pretraining run resumed on another process count continues to the weights
of an uninterrupted run; a checkpoint of another run is set aside, never overwritten; SIGTERM to the
whole process group (loader workers included, as slurmstepd sends it at a time limit) saves the state
at the end of the step."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import pool_features, tiny_params

from ajepa.export import read_export
from ajepa.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups on CPU")

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "GROUP_RANK")
CHECKPOINT = "models/pretrain_state/checkpoint.pt"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """32 one-second synthetic clips as features (96 x 128, a 6 x 8 patch grid)."""
    root = tmp_path_factory.mktemp("features")
    return pool_features(root, root / "features", seed=5, clips=32)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES} | {"OMP_NUM_THREADS": "1"}


def _set_params(root, processes: int, **pretrain) -> None:
    p = tiny_params()
    p["pretrain"]["optim"]["epochs"] = pretrain.pop("epochs", 1)
    p["pretrain"]["datasets"] = ["synth"]
    p["pretrain"].update(pretrain)
    p["distributed"]["processes"] = processes
    (root / "params.yaml").write_text(yaml.safe_dump(p))


def _project(root, store_dir, processes: int, **pretrain):
    shutil.copytree(store_dir, root / "data/features/synth")
    _set_params(root, processes, **pretrain)
    subprocess.run([sys.executable, "-m", "ajepa.cli", "pool", "synth"], cwd=root, check=True, env=_env(),
                   capture_output=True)
    return root


def _pretrain(root, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ajepa.cli", "pretrain", *args], cwd=root, capture_output=True,
                       text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _assert_same_weights(a, b) -> None:
    for which in ("context", "target"):
        w1 = read_export(a / f"models/pretrain/{which}")[1]
        w2 = read_export(b / f"models/pretrain/{which}")[1]
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), (which, k)


@pytest.fixture(scope="module")
def straight(store_dir, tmp_path_factory):
    """The uninterrupted one-process run (4 steps)."""
    root = _project(tmp_path_factory.mktemp("straight"), store_dir, 1)
    _pretrain(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_resume_on_another_process_count_continues_the_run(store_dir, straight, tmp_path, before, after):
    root = _project(tmp_path, store_dir, before)
    _pretrain(root, "--stop-after", "2")
    assert load_checkpoint(root / CHECKPOINT)["step"] == 2
    _set_params(root, after)
    out = _pretrain(root).stdout
    assert "2 steps (from step 2, 4 done)" in out and f"with {after} process(es)" in out
    assert sorted((root / "models/pretrain_state").glob("*.pt")) == [root / CHECKPOINT]  # nothing set aside
    _assert_same_weights(straight, root)


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_set_aside(store_dir, tmp_path):
    root = _project(tmp_path, store_dir, 1)
    _pretrain(root, "--stop-after", "3")
    first = load_checkpoint(root / CHECKPOINT)
    _set_params(root, 1, seed=1)
    out = _pretrain(root, "--stop-after", "1").stdout
    aside = root / f"models/pretrain_state/checkpoint.{first['run_hash'][:12]}.pt"
    assert f"kept as {aside.relative_to(root)}; starting afresh" in out and "from step 0" in out
    kept = load_checkpoint(aside)
    assert kept["step"] == 3 and kept["run_hash"] == first["run_hash"]
    assert all(torch.equal(kept["model"][k], first["model"][k]) for k in first["model"])
    assert load_checkpoint(root / CHECKPOINT)["step"] == 1


def _logged_steps(root) -> int:
    curve = root / "results/pretrain/live/plots/metrics/train/loss.tsv"
    return max(0, len(curve.read_text().splitlines()) - 1) if curve.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_process_group_saves_at_the_end_of_the_step(store_dir, tmp_path, processes):
    """`ajepa pretrain` with two loader workers per process, in its own session; SIGTERM to every process of
    it once two steps are logged, as slurmstepd sends it. The state of the last finished step is saved, and
    the rerun ends at the weights of the uninterrupted run."""
    settings = {"epochs": 20, "num_workers": 2, "checkpoint_every": 1000}  # 80 steps; no periodic checkpoint
    straight = _project(tmp_path / "straight", store_dir, 1, **settings)
    _pretrain(straight)
    root = _project(tmp_path / "cut", store_dir, processes, **settings)
    proc = subprocess.Popen([sys.executable, "-m", "ajepa.cli", "pretrain"], cwd=root, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while _logged_steps(root) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    step = load_checkpoint(root / CHECKPOINT)["step"]
    assert 2 <= step < 80
    # (the spawned processes' resource tracker, signalled too, may warn after it)
    assert any(line.startswith("ajepa pretrain: stopped by SIGTERM") for line in err.splitlines()), err[-3000:]
    out = _pretrain(root).stdout
    assert f"from step {step}, 80 done" in out
    _assert_same_weights(straight, root)
