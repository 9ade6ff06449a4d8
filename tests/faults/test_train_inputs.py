"""Bad input to training, through the CLI in this process: non-finite params, a NaN-making learning
rate, checkpoints that do not fit, a state folder in use. Each fails in one line, naming what is wrong."""

import os
import pickle
import zipfile

import pytest
import torch
import yaml
from train_project import cwd, make_template, project, smoke_params, write_params

from ajepa.cli import main
from ajepa.config import load_params
from ajepa.errors import ConfigError
from ajepa.lock import state_lock
from ajepa.train.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT = "models/pretrain_state/checkpoint.pt"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_template(tmp_path_factory.mktemp("template"))


def _run(root, capsys, *args) -> tuple[int, str]:
    """(exit code, the one line on stderr)"""
    with cwd(root):
        code = main(list(args))
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    err = [line for line in err if not line.startswith(("pretrain:", "finetune "))]  # progress bars
    assert len(err) <= 1, err
    return code, err[0] if err else ""


@pytest.mark.parametrize("key", ["pretrain.optim.lr", "pretrain.optim.final_lr", "pretrain.optim.grad_clip",
                                 "pretrain.optim.warmup_epochs", "finetune.synth.weight_decay",
                                 "datasets.synth.prepare.duration_s", "pretrain.optim.betas[0]"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused_naming_the_key(key, value, tmp_path):
    p = smoke_params()
    *parents, last = key.replace("[0]", "").split(".")
    section = p
    for name in parents:
        section = section[name]
    if key.endswith("[0]"):
        section[last][0] = "NONFINITE"
    else:
        section[last] = "NONFINITE"
    write_params(tmp_path, p)
    path = tmp_path / "params.yaml"
    path.write_text(path.read_text().replace("NONFINITE", value))  # YAML's own spelling, unquoted
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert f"{key} = " in str(e.value) and "must be a finite number" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("steps", ["-5", "0", "two"])
def test_stop_after_must_be_at_least_one(steps, template, tmp_path, capsys):
    root = project(template, tmp_path / "p")
    with cwd(root), pytest.raises(SystemExit) as e:
        main(["pretrain", "--stop-after", steps])
    assert e.value.code == 2
    assert "argument --stop-after" in capsys.readouterr().err
    assert not (root / "models").exists() and not (root / "results").exists()


@pytest.mark.slow
def test_nan_weights_stop_with_the_last_finite_checkpoint_kept(template, tmp_path, capsys):
    """lr 1e6: the third step's loss is still finite (about 3e22) but its update leaves NaN weights;
    checking the loss alone saved them as the checkpoint, and every rerun resumed from NaN."""
    root = project(template, tmp_path / "p", optim={"lr": 1e6}, checkpoint_every=1)
    code, line = _run(root, capsys, "pretrain")
    assert code == 2
    assert line.startswith("ajepa pretrain: error: non-finite weights (") and "after the optimiser step at step 2" in line
    assert f"the last good checkpoint {CHECKPOINT} (step 2) is kept" in line
    state = load_checkpoint(root / CHECKPOINT)
    assert state["step"] == 2
    for part in ("model", "position_only"):
        assert all(torch.isfinite(t).all() for t in state[part].values()), part
    assert _run(root, capsys, "pretrain")[1] == line  # the same run resumes from the finite state, the same stop
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["pretrain"]["optim"]["lr"] = smoke_params()["pretrain"]["optim"]["lr"]
    write_params(root, p)
    assert _run(root, capsys, "pretrain") == (0, "")  # a sane lr: another run, from scratch, to the end
    assert (root / "models/pretrain/target/model.safetensors").exists()


@pytest.mark.slow
def test_finetune_stops_on_nan_weights(template, tmp_path, capsys):
    root = project(template, tmp_path / "p")
    assert _run(root, capsys, "pretrain")[0] == 0
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["finetune"]["synth"]["lr"] = 1e12
    write_params(root, p)
    code, line = _run(root, capsys, "finetune", "synth")
    assert code == 2 and line.startswith("ajepa finetune: error: non-finite ")
    assert ("at epoch 1 of finetune pretrained-fold1: stopped; no checkpoint was written yet; lower the benchmark's "
            "finetune lr") in line
    assert not (root / "results/finetune/synth/metrics.json").exists()


@pytest.fixture
def stopped(template, tmp_path, capsys):
    """A pretraining run stopped after 2 of its 6 steps, its checkpoint resumable."""
    root = project(template, tmp_path / "p")
    assert _run(root, capsys, "pretrain", "--stop-after", "2")[0] == 0
    return root


def _tamper(root, change) -> None:
    state = load_checkpoint(root / CHECKPOINT)
    change(state)
    save_checkpoint(root / CHECKPOINT, state)


def test_checkpoint_missing_a_weight_names_file_and_key(stopped, capsys):
    _tamper(stopped, lambda s: s["model"].pop("predictor.mask_token"))
    assert _run(stopped, capsys, "pretrain") == (2, f"ajepa pretrain: error: {CHECKPOINT} [model]: missing key "
                                                    "'predictor.mask_token': not a state of this model")


def test_checkpoint_with_a_wrong_shape_names_file_and_key(stopped, capsys):
    key = "context_encoder.blocks.0.attn.qkv.weight"
    _tamper(stopped, lambda s: s["model"].__setitem__(key, torch.zeros(3, 3)))
    assert _run(stopped, capsys, "pretrain") == (2, f"ajepa pretrain: error: {CHECKPOINT} [model]: '{key}' is "
                                                    "[3, 3], the model expects [96, 32]")


@pytest.mark.slow
def test_checkpoint_with_a_wrong_optimizer_moment_or_part_missing(stopped, capsys):
    original = (stopped / CHECKPOINT).read_bytes()

    def moment(s):
        first = next(iter(s["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(7)
    _tamper(stopped, moment)
    code, line = _run(stopped, capsys, "pretrain")
    assert code == 2 and line.startswith(f"ajepa pretrain: error: {CHECKPOINT} [optimizer]: optimizer 'exp_avg' is [7]")
    (stopped / CHECKPOINT).write_bytes(original)
    _tamper(stopped, lambda s: s.pop("rng"))
    assert _run(stopped, capsys, "pretrain") == (2, f"ajepa pretrain: error: {CHECKPOINT}: missing key 'rng': not a "
                                                    "checkpoint this run can resume")


def test_truncated_or_malicious_checkpoint_is_refused(stopped, tmp_path, capsys):
    """Held before: a damaged checkpoint is one line, and one that would run code when unpickled is refused."""
    path = stopped / CHECKPOINT
    path.write_bytes(path.read_bytes()[:4000])
    code, line = _run(stopped, capsys, "pretrain")
    assert code == 2 and line.startswith(f"ajepa pretrain: error: {CHECKPOINT}: corrupt or truncated checkpoint")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with zipfile.ZipFile(path, "w") as z:  # torch's zip layout, a hostile data.pkl inside
        z.writestr("checkpoint/data.pkl", pickle.dumps({"step": Payload()}, protocol=2))
        z.writestr("checkpoint/version", "3\n")
    code, line = _run(stopped, capsys, "pretrain")
    assert code == 2 and line.startswith(f"ajepa pretrain: error: {CHECKPOINT}: corrupt or truncated checkpoint")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("stage, folder", [("finetune", "models/finetune_state/synth"),
                                           ("linear", "data/embeddings/synth")])
def test_downstream_state_folders_are_locked(stage, folder, stopped, capsys):
    with state_lock(stopped / folder, "test"):  # another open file description: flock refuses it too
        code, line = _run(stopped, capsys, stage, "synth")
    assert code == 2 and line == (f"ajepa {stage}: error: {folder} is in use by another ajepa {stage} synth "
                                  f"(PID {os.getpid()}); wait for it to end or stop it, then rerun (it resumes "
                                  "from the last checkpoint)")
