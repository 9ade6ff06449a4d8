"""The orchestrators end to end on a tiny configuration, each in its own temporary copy of the project."""

import json
import math

import pandas as pd
import pytest
import yaml

from conftest import make_project_copy, run, tiny_params


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory):
    root = make_project_copy(tmp_path_factory.mktemp("dvc"), tiny_params())
    r = run(["dvc", "repro"], root)
    return root, r


@pytest.fixture(scope="module")
def snakemake_copy(tmp_path_factory):
    root = make_project_copy(tmp_path_factory.mktemp("smk"), tiny_params(), git=False)
    r = run(["snakemake", "--cores", "2"], root)
    return root, r


def test_dvc_repro_produces_features(dvc_copy):
    root, r = dvc_copy
    manifest = pd.read_csv(root / "data/manifests/synth.csv")
    assert len(manifest) == 24 + 12 * 5
    stats = json.loads((root / "data/features/synth/stats.json").read_text())
    assert stats["accepted"] == len(manifest) and stats["rejected"] == 0
    assert stats["grid"] == [6, 8] and stats["target_length"] == 96
    assert "features synth: 84 of 84 clips" in r.stdout  # the stage summary
    # the pipeline is up to date afterwards: nothing reruns
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root).stdout


def test_changing_target_length_reruns_features_only(dvc_copy):
    root, _ = dvc_copy
    params = tiny_params()
    params["datasets"]["synth"]["target_length"] = 112
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run(["dvc", "status"], root).stdout
        assert "features@synth" in status and "prepare@synth" not in status
    finally:
        (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))


def test_snakemake_produces_the_same_features(dvc_copy, snakemake_copy):
    dvc_root, smk_root = dvc_copy[0], snakemake_copy[0]
    a, b = dvc_root / "data/features/synth", smk_root / "data/features/synth"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir() if p.name != ".snakemake_timestamp")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (dvc_root / "data/manifests/synth.csv").read_bytes() == (smk_root / "data/manifests/synth.csv").read_bytes()
    # pretraining is deterministic too: the same encoder weights from either orchestrator
    encoder = "models/pretrain/encoder.safetensors"
    assert (dvc_root / encoder).read_bytes() == (smk_root / encoder).read_bytes()


def test_dvc_pretrain_outputs(dvc_copy):
    root, r = dvc_copy
    metrics = json.loads((root / "results/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 2 * (24 // 8) and math.isfinite(metrics["final_loss"])
    assert (root / "models/pretrain_state/checkpoint.pt").exists()
    assert (root / "results/pretrain/masks.png").read_bytes()[:4] == b"\x89PNG"
    shown = run(["dvc", "metrics", "show"], root).stdout
    assert "final_loss" in shown


def test_published_datasets_become_stages_in_both_orchestrators(tmp_path):
    published = ["esc50", "spc2", "spc1", "as20k", "as2m", "vox1"]
    params = tiny_params()
    params["pipeline"]["datasets"] = ["synth", *published]
    root = make_project_copy(tmp_path / "copy", params)
    stages = run(["dvc", "stage", "list", "--name-only"], root).stdout.split()
    status = run(["dvc", "status", *(f"prepare@{d}" for d in published)], root).stdout
    targets = [f"data/features/{d}" for d in published]
    dry = run(["snakemake", "--dry-run", "--cores", "1", *targets], root).stdout
    for d in published:
        assert f"prepare@{d}" in stages and f"features@{d}" in stages
        assert f"prepare@{d}" in status  # its params (datasets.{d}.prepare) resolve
        assert f"dataset={d}" in dry
    assert "prepare@synth" in stages
