"""Real `ajepa pretrain` processes and real signals: two at once, kill -9, SIGTERM.

Each pretraining run here is the smoke model on 24 synthetic clips, 60 epochs of 3 steps."""

import os
import signal

import pytest
from train_project import ajepa, cwd, last_line, logged_steps, make_template, project, start, wait_for

from ajepa.cli import main
from ajepa.train.checkpoint import load_checkpoint

EPOCHS = 60  # 180 steps: a run long enough to be caught in the middle, even on a busy machine
ENCODERS = ("models/pretrain/context/model.safetensors", "models/pretrain/target/model.safetensors")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_template(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def straight(template, tmp_path_factory):
    """The encoders of one uninterrupted run, byte for byte."""
    root = project(template, tmp_path_factory.mktemp("straight") / "p", optim={"epochs": EPOCHS})
    r = ajepa(root, "pretrain")
    assert r.returncode == 0, r.stderr[-2000:]
    return {name: (root / name).read_bytes() for name in ENCODERS}


@pytest.mark.slow
def test_second_run_refuses_and_kill_9_resumes_to_the_same_bytes(template, straight, tmp_path, capsys):
    root = project(template, tmp_path / "p", optim={"epochs": EPOCHS})
    state = root / "models/pretrain_state"
    first = start(root, "pretrain")
    try:
        wait_for(lambda: (state / "checkpoint.pt").exists(), first)
        os.kill(first.pid, signal.SIGSTOP)  # holds its lock and its place while the second one tries
        with cwd(root):  # the second process is this one
            assert main(["pretrain"]) == 2
        assert capsys.readouterr().err == (
            f"ajepa pretrain: error: models/pretrain_state is in use by another ajepa pretrain (PID {first.pid}); "
            "wait for it to end or stop it, then rerun (it resumes from the last checkpoint)\n")
        saved = load_checkpoint(state / "checkpoint.pt")["step"]
        first.kill()  # SIGKILL: no handler, no `finally`, the lock goes with the process
    finally:
        first.kill()
        first.communicate()
    assert 0 < saved < 3 * EPOCHS
    third = ajepa(root, "pretrain")  # would be refused if the killed process had left its lock behind
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"(from step {saved}, {3 * EPOCHS} done)" in third.stdout
    assert sorted(p.name for p in state.iterdir()) == [".ajepa.lock", "checkpoint.pt"]  # no temporary left
    assert {name: (root / name).read_bytes() for name in ENCODERS} == straight


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_and_the_rerun_is_the_same_run(template, straight, tmp_path):
    # no periodic checkpoint before the end: the only one mid-run is the one SIGTERM makes
    root = project(template, tmp_path / "p", optim={"epochs": EPOCHS}, checkpoint_every=10_000)
    proc = start(root, "pretrain")
    try:
        wait_for(lambda: logged_steps(root) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = load_checkpoint(root / "models/pretrain_state/checkpoint.pt")["step"]
    assert 3 <= step < 3 * EPOCHS
    assert last_line(err) == (f"ajepa pretrain: stopped by SIGTERM after step {step}: checkpoint "
                              "models/pretrain_state/checkpoint.pt saved; rerun to resume from it")
    assert not any((root / name).exists() for name in ENCODERS)
    assert not (root / "results/pretrain/metrics.json").exists()  # an unfinished run reports nothing
    assert [p.name for p in (root / "models/pretrain_state").iterdir() if p.name.endswith(".tmp")] == []
    rerun = ajepa(root, "pretrain")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"(from step {step}, {3 * EPOCHS} done)" in rerun.stdout
    assert {name: (root / name).read_bytes() for name in ENCODERS} == straight


@pytest.mark.slow
def test_sigterm_outside_the_training_loop_stops_with_one_line(template, tmp_path):
    """A stage with no step boundary to wait for (here `features`) stops at once, removing its temporaries."""
    root = project(template, tmp_path / "p")
    proc = start(root, "features", "synth")
    try:
        wait_for(lambda: (root / "data/features/.synth.partial").is_dir(), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert last_line(err) == "ajepa features: stopped by SIGTERM"
    assert "Traceback" not in err  # its pool's workers, terminated with SIGTERM too, end quietly as before
    assert not any(p.name.endswith(".tmp") for p in (root / "data/features").iterdir())
    assert (root / "data/features/.synth.partial").is_dir()  # kept: a rerun resumes from its finished shards


@pytest.mark.parametrize("cut", ["empty summary", "cut summary", "cut row"])
def test_a_kill_inside_dvclive_writes_does_not_stop_the_resume(tmp_path, cut):
    """DVCLive rewrites metrics.json and appends to its tables in place at every step. A kill -9 in the
    middle of a write (it happened once to the kill test above in a `make test`) left a summary that
    DVCLive's resume could not parse, and every rerun died on a JSONDecodeError. A cut last row of a
    table is dropped (the resumed run logs that step again) and the table stays whole."""
    import json

    import pandas as pd

    from ajepa.stages.tracking import open_live

    live = tmp_path / "live"
    log = open_live(live)(0)
    for step in range(8):
        log(step, {"train/loss": 1.0 / (step + 1)})
    table = live / "plots/metrics/train/loss.tsv"
    if cut == "empty summary":
        (live / "metrics.json").write_text("")
    elif cut == "cut summary":
        (live / "metrics.json").write_text((live / "metrics.json").read_text()[:9])
    else:
        with open(table, "a") as f:
            f.write("8\t")  # the step written, the kill before the value
    log = open_live(live)(5)  # resuming from a checkpoint at step 5
    for step in range(5, 7):
        log(step, {"train/loss": 1.0 / (step + 1)})
    rows = pd.read_csv(table, sep="\t")
    assert rows["step"].tolist() == [0, 1, 2, 3, 4, 5, 6] and not rows.isna().any().any()
    assert json.loads((live / "metrics.json").read_text())["step"] == 6
