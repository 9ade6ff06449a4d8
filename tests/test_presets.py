"""Presets (presets/NAME.yaml) merged into params.yaml by `ajepa preset NAME`."""

import copy
import shutil

import pytest
import yaml
from conftest import REPO, load_repo_params, tiny_params

from ajepa.cli import main
from ajepa.config import load_params, parse_params
from ajepa.errors import ConfigError
from ajepa.tools import paramfile
from ajepa.tools.presets import load_preset, merge


@pytest.fixture
def project(in_tmp):
    """The repository's params.yaml and presets in a temporary directory (the working directory)."""
    shutil.copy(REPO / "params.yaml", in_tmp / "params.yaml")
    shutil.copytree(REPO / "presets", in_tmp / "presets")
    return in_tmp


def _write_preset(root, name, preset: dict):
    (root / "presets" / f"{name}.yaml").write_text(yaml.safe_dump(preset))


def test_smoke_preset_gives_the_test_configuration_and_keeps_the_file_layout(project, capsys):
    before = (project / "params.yaml").read_text()
    assert main(["preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "pretrain.encoder.embed_dim: 192 -> 32" in out and "datasets.synth.target_length: 192 -> 96" in out
    after = (project / "params.yaml").read_text()
    assert yaml.safe_load(after) == tiny_params()
    # only the changed values' lines change (a list's items, one per line as `dvc exp run -S` writes them):
    # comments and every other line survive, and the file stays in DVC's layout
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    keys = {line.split(":")[0].strip().rsplit(".", 1)[-1] for line in out.splitlines() if " -> " in line}
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) >= len(keys)
    assert all(a.strip().startswith("- ") or a.split(":")[0].strip() in keys for a, _ in changed), changed
    assert paramfile.formatted(after) == after
    assert "  encoder:                   # paper: ViT-B = 768 / 12 / 12" in after
    # applying it again changes nothing
    assert main(["preset", "smoke"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert (project / "params.yaml").read_text() == after


def test_dry_run_lists_changes_and_writes_nothing(project, capsys):
    before = (project / "params.yaml").read_bytes()
    assert main(["preset", "smoke", "--dry-run"]) == 0
    assert "would change" in capsys.readouterr().out
    assert (project / "params.yaml").read_bytes() == before


def test_preset_with_unknown_key_is_refused(project, capsys):
    _write_preset(project, "typo", {"pretrain": {"encoder": {"width": 768}}})
    before = (project / "params.yaml").read_bytes()
    assert main(["preset", "typo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "presets/typo.yaml" in err and "pretrain.encoder.width" in err
    assert (project / "params.yaml").read_bytes() == before


def test_preset_with_invalid_value_leaves_params_untouched(project, capsys):
    _write_preset(project, "bad", {"pretrain": {"encoder": {"embed_dim": 102}}})  # 4 heads do not divide 102
    before = (project / "params.yaml").read_bytes()
    assert main(["preset", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pretrain.encoder.embed_dim = 102" in err and "presets/bad.yaml" in err
    assert (project / "params.yaml").read_bytes() == before
    assert not [p for p in project.iterdir() if p.name.startswith(".params.yaml")]  # no temporary left


def test_preset_section_where_params_has_a_value(project, capsys):
    _write_preset(project, "shape", {"pretrain": {"loss": {"kind": "l2"}}})
    assert main(["preset", "shape"]) == 2
    assert "pretrain.loss is a section in the preset" in capsys.readouterr().err


def test_unknown_preset_lists_the_known_ones(project, capsys):
    assert main(["preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "presets/nope.yaml" in err and "paper" in err and "smoke" in err


def test_floats_are_written_and_read_as_numbers(project):
    """ruamel (and so `dvc exp run -S`) writes 1e-06, which YAML 1.1 readers take for a string."""
    _write_preset(project, "lr", {"pretrain": {"optim": {"final_lr": 1e-6}}})
    assert main(["preset", "lr"]) == 0
    text = (project / "params.yaml").read_text()
    assert "final_lr: 1.0e-06" in text and yaml.safe_load(text)["pretrain"]["optim"]["final_lr"] == 1e-6
    # params.yaml as DVC writes it after `dvc exp run -S pretrain.optim.final_lr=1e-6`
    (project / "params.yaml").write_text(text.replace("final_lr: 1.0e-06", "final_lr: 1e-06"))
    assert load_params(project / "params.yaml").pretrain.optim.final_lr == 1e-6


def test_merge_replaces_lists_and_reports_changes():
    params = {"a": {"b": [1, 2], "c": 1.0}, "d": "x"}
    changes = merge(params, {"a": {"b": [3]}, "d": "x"})
    assert params == {"a": {"b": [3], "c": 1.0}, "d": "x"}
    assert [(c.key, c.old, c.new) for c in changes] == [("a.b", [1, 2], [3])]
    with pytest.raises(ConfigError, match="a.z: not a key"):
        merge(params, {"a": {"z": 1}})


def test_paper_preset_is_the_paper_setup():
    """The paper's run (docs/method.md), and only keys params.yaml has."""
    preset = load_preset(REPO / "presets" / "paper.yaml")
    params = load_repo_params()
    merge(params, copy.deepcopy(preset))  # raises on a key params.yaml lacks
    p = params["pretrain"]
    assert (p["encoder"]["embed_dim"], p["encoder"]["depth"], p["encoder"]["num_heads"]) == (768, 12, 12)
    assert (p["predictor"]["depth"], p["predictor"]["embed_dim"]) == (16, 512)
    assert (p["optim"]["epochs"], p["optim"]["batch_size"], p["optim"]["lr"]) == (24, 512, 2e-4)
    assert p["datasets"] == ["as2m"]
    assert (p["target_layers"], p["sigreg"], p["loss"]) == (1, 0.0, "l2")  # the paper's objective, nothing added
    assert params["downstream"]["encoder"] == "target"
    six = ["as2m", "as20k", "esc50", "spc2", "spc1", "vox1"]
    assert all(params["finetune"][b]["pooling"] == "all" for b in six)  # AudioMAE's head
    assert params["pipeline"]["datasets"] == six and params["pipeline"]["benchmarks"] == six


def test_paper_preset_validates_against_params_yaml():
    params = load_repo_params()
    merge(params, load_preset(REPO / "presets" / "paper.yaml"))
    parse_params(params, source="params.yaml with presets/paper.yaml")


def test_long_preset_is_the_default_with_eight_times_its_pretraining_steps():
    """The pools and the epochs move: 8x the default's optimiser steps, the same eight clips a pool speaker; the
    masks are block masks, those its measured seeds used, whatever the default's."""
    def steps(p):
        pool = sum(p["datasets"][d]["prepare"]["pool_clips"] for d in p["pretrain"]["datasets"])
        return p["pretrain"]["optim"]["epochs"] * (pool // p["pretrain"]["optim"]["batch_size"])

    default = load_repo_params()
    long = copy.deepcopy(default)
    merge(long, load_preset(REPO / "presets" / "long.yaml"))
    parse_params(long, source="params.yaml with presets/long.yaml")
    assert steps(long) == 8 * steps(default)
    words = [p["datasets"]["words"]["prepare"] for p in (default, long)]
    assert [w["pool_clips"] // w["pool_speakers"] for w in words] == [8, 8]
    assert long["pretrain"]["encoder"] == default["pretrain"]["encoder"] and long["linear"] == default["linear"]
    assert long["pretrain"]["masking"]["mode"] == "block"
