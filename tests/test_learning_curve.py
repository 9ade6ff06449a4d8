"""The learning curve from step 0: `ajepa pretrain` with the probe on scores the untrained encoder first,
a resumed run does not score it again, and the report draws each dataset's curve against steps and
clips seen with the fbank's level (the data of the DVC plot dvc.yaml declares)."""

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_project_copy, run, tiny_params

from ajepa import paths
from ajepa.cli import main
from ajepa.config import load_params
from ajepa.downstream.linear import fbank_validation_probe, validation_probe
from ajepa.downstream.protocols import load_task
from ajepa.export import read_export
from ajepa.plots import learning_curves
from ajepa.stages.report import write_learning_curves
from ajepa.train.pretrain import build_model

CURVE = paths.pretrain_live_dir() / "plots" / "metrics"


@pytest.fixture(scope="module")
def synth_features(tmp_path_factory):
    """The smoke preset's `synth` (24 pool clips, 5 labeled clips per class) prepared, pooled and pretrained
    on alone (in this process): 3 steps an epoch, 2 epochs, a probe every 3 steps."""
    root = tmp_path_factory.mktemp("curve")
    p = tiny_params()
    p["pretrain"]["datasets"] = ["synth"]
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        for argv in (["prepare", "synth"], ["features", "synth"], ["pool", "synth"]):
            assert main(argv) == 0
        shutil.copytree(root / "data", root / "data.before")  # for the resumed run
        assert main(["pretrain"]) == 0
    return root


def _pretrain(root, monkeypatch, *argv) -> None:
    monkeypatch.chdir(root)
    assert main(["pretrain", *argv]) == 0


def _rows(root, name: str) -> pd.DataFrame:
    return pd.read_csv(root / CURVE / f"{name}.tsv", sep="\t")


@pytest.mark.slow  # a training run
def test_the_curve_starts_at_the_untrained_encoder(synth_features, monkeypatch):
    root = synth_features
    monkeypatch.chdir(root)
    params = load_params(root / "params.yaml")
    cfg = params.pretrain
    curve = _rows(root, "probe/synth/context")
    assert list(curve["step"]) == [0, 3, 6]
    # step 0 is the encoder as `build` makes it from the seed, before any step
    task = load_task("synth", paths.features_dir("synth"))
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, tuple(task.store.stats["grid"]), int(task.store.stats["patch_size"]))
    assert curve["context"].iloc[0] == pytest.approx(validation_probe(untrained.context_encoder, task, cfg.probe.l2,
                                                                      torch.device("cpu")), abs=1e-9)
    # and the last row is the exported (pretrained) encoder's
    _, state, _ = read_export(root / "models/pretrain/context")
    untrained.context_encoder.load_state_dict(state)
    assert curve["context"].iloc[-1] == pytest.approx(validation_probe(untrained.context_encoder, task, cfg.probe.l2,
                                                                       torch.device("cpu")), abs=1e-9)
    # the fbank's level beside every probe, the same probe on the same clips
    fbank = _rows(root, "probe/synth/fbank")
    assert list(fbank["step"]) == [0, 3, 6]
    assert list(fbank["fbank"]) == pytest.approx([fbank_validation_probe(task, cfg.probe.l2)] * 3, abs=1e-9)
    # the training rows are at the steps done
    assert list(_rows(root, "train/loss")["step"]) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # two training runs
def test_a_resumed_run_logs_step_0_once(synth_features, tmp_path, monkeypatch):
    root = tmp_path / "resumed"
    shutil.copytree(synth_features / "data.before", root / "data")
    shutil.copy2(synth_features / "params.yaml", root / "params.yaml")
    _pretrain(root, monkeypatch, "--stop-after", "4")
    assert list(_rows(root, "probe/synth/context")["step"]) == [0, 3]
    _pretrain(root, monkeypatch)
    assert list(_rows(root, "probe/synth/context")["step"]) == [0, 3, 6]
    assert list(_rows(root, "train/loss")["step"]) == [1, 2, 3, 4, 5, 6]
    straight = _rows(synth_features, "probe/synth/context")["context"]
    assert list(_rows(root, "probe/synth/context")["context"]) == pytest.approx(list(straight), abs=1e-9)


@pytest.mark.slow  # the module's training run
def test_the_report_draws_each_dataset_against_steps_and_clips_seen(synth_features, tmp_path):
    curves = learning_curves(synth_features / CURVE)
    assert list(curves) == ["synth/context", "synth/fbank"]
    batch = load_params(synth_features / "params.yaml").pretrain.optim.batch_size
    write_learning_curves(curves, batch, tmp_path / "curves")
    table = pd.read_csv(tmp_path / "curves" / "synth.csv")
    assert list(table.columns) == ["step", "clips_seen", "context", "target", "fbank"]
    assert list(table["step"]) == [0, 3, 6] and list(table["clips_seen"]) == [0, 3 * batch, 6 * batch]
    assert list(table["context"]) == pytest.approx(list(curves["synth/context"]))
    assert table["target"].isna().all() and table["fbank"].nunique() == 1  # not probed; a level line
    assert (tmp_path / "curves" / "synth.png").stat().st_size > 0


@pytest.mark.slow  # dvc
def test_dvc_draws_the_curve_against_clips_seen(tmp_path):
    root = make_project_copy(tmp_path / "p", tiny_params())
    folder = root / "results" / "plots" / "learning_curve"
    folder.mkdir(parents=True)
    pd.DataFrame({"step": [0, 3], "clips_seen": [0, 24], "context": [40.0, 55.0], "target": [None, None],
                  "fbank": [47.5, 47.5]}).to_csv(folder / "synth.csv", index=False)
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)
    [plot] = shown["data"]["results/plots/learning_curve/synth.csv"]
    assert plot["content"]["encoding"]["x"]["field"] == "clips_seen"
    drawn = {(v["field"], v["clips_seen"], v["dvc_inferred_y_value"]) for v in plot["content"]["data"]["values"]}
    assert {("context", "0", "40.0"), ("context", "24", "55.0"), ("fbank", "24", "47.5")} <= drawn
