"""The orchestrators end to end on the smoke preset, each in its own temporary copy of the project.

One `dvc repro`, one `snakemake --cores 2` and one `dvc exp run` serve every test here (module
fixtures); the tests that look at the DVC copy leave its workspace as they found it."""

import csv
import io
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_project, make_project_copy, parse_dry_run, run, tiny_params


@pytest.fixture(scope="module")
def dvc_copy(smoke_run, tmp_path_factory):
    """The smoke run (`dvc repro`, committed with dvc.lock and the metrics, as a user commits a run)."""
    root, r = smoke_run
    return copy_project(root, tmp_path_factory.mktemp("dvc") / "project"), r


@pytest.fixture(scope="module")
def snakemake_copy(tmp_path_factory):
    root = make_project_copy(tmp_path_factory.mktemp("smk"), tiny_params())
    r = run(["snakemake", "--cores", "2"], root)
    return root, r


@pytest.mark.slow
def test_dvc_repro_produces_features(dvc_copy):
    root, r = dvc_copy
    manifest = pd.read_csv(root / "data/manifests/synth.csv")
    assert len(manifest) == 24 + 12 * 5
    stats = json.loads((root / "data/features/synth/stats.json").read_text())
    assert stats["accepted"] == len(manifest) and stats["rejected"] == 0
    assert stats["grid"] == [6, 8] and stats["target_length"] == 96
    assert "features synth: 84 of 84 clips" in r.stdout  # the stage summary
    # the pipeline is up to date afterwards, and git holds everything but DVC's data
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root).stdout
    assert run(["git", "status", "--porcelain"], root).stdout == ""


def _set_params(root: Path, change) -> None:
    params = tiny_params()
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_each_stage_reruns_only_for_its_own_params(dvc_copy):
    root, _ = dvc_copy
    try:
        _set_params(root, lambda p: p["datasets"]["synth"].update(target_length=112))
        status = run(["dvc", "status"], root).stdout
        assert "features@synth" in status and "prepare@synth" not in status
        # one benchmark's fine-tuning recipe: that benchmark's fine-tuning only (the report follows its outputs)
        _set_params(root, lambda p: p["finetune"]["synth"].update(epochs=3))
        stages = set(re.findall(r"^(\S+):$", run(["dvc", "status"], root).stdout, re.M))
        assert stages == {"check", "finetune@synth"}  # `check` validates every parameter, so any change reruns it
        # the probes' settings: the probes (and the report that shows them), never pretraining
        _set_params(root, lambda p: p["linear"].update(max_iter=7))
        stages = set(re.findall(r"^(\S+):$", run(["dvc", "status"], root).stdout, re.M))
        assert stages == {"check", "linear@synth", "linear@words"}
        # which encoder downstream uses: probes, fine-tuning and the report, not pretraining
        _set_params(root, lambda p: p["downstream"].update(encoder={"context": "target"}.get(p["downstream"]["encoder"], "context")))
        stages = set(re.findall(r"^(\S+):$", run(["dvc", "status"], root).stdout, re.M))
        assert stages == {"check", "linear@synth", "linear@words", "finetune@synth", "finetune@words", "report"}
    finally:
        run(["git", "checkout", "params.yaml"], root)


@pytest.mark.slow
def test_dvc_pretrain_outputs(dvc_copy):
    root, r = dvc_copy
    metrics = json.loads((root / "results/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 2 * ((24 + 24) // 8) and math.isfinite(metrics["final_loss"])  # both pools
    assert [json.loads((root / f"data/pool/{d}.json").read_text())["clips"] for d in ("synth", "words")] == [24, 24]
    assert (root / "models/pretrain_state/checkpoint.pt").exists()  # no output, kept beside them
    assert (root / "results/pretrain/masks.png").read_bytes()[:4] == b"\x89PNG"
    shown = run(["dvc", "metrics", "show"], root).stdout
    assert "final_loss" in shown


@pytest.mark.slow
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
        assert f"item={d}" in dry
    assert "prepare@synth" in stages


@pytest.mark.slow
def test_dvc_exp_run_compares_masking_modes(dvc_copy):
    """`dvc exp run -S` reruns what the changed key feeds, and `dvc exp show` puts both runs side by side."""
    root, _ = dvc_copy
    r = run(["dvc", "exp", "run", "--temp", "-n", "block-masks", "-S", "pretrain.masking.mode=block"], root)
    out = r.stdout + r.stderr
    assert "Stage 'features@synth' didn't change, skipping" in out and "Running stage 'pretrain'" in out
    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], root).stdout)))
    baseline = next(row for row in rows if row["typ"] == "baseline" and row["rev"] != "workspace")
    experiment = next(row for row in rows if row["Experiment"] == "block-masks")
    assert (baseline["pretrain.masking.mode"], experiment["pretrain.masking.mode"]) == ("curriculum", "block")
    for key in ("final_loss", "synth.linear.accuracy", "synth.finetune.accuracy", "words.linear.accuracy"):
        assert re.fullmatch(r"[\d.]+", baseline[key]) and re.fullmatch(r"[\d.]+", experiment[key]), key
    assert baseline["final_loss"] != experiment["final_loss"]
    assert float(baseline["tf_fraction"]) > 0.0 == float(experiment["tf_fraction"])
    # --temp ran it beside the workspace, which still holds the baseline
    assert run(["git", "status", "--porcelain"], root).stdout == ""


# Files whose contents depend on the clock or on unseeded global state, and what is compared instead.
TIMING_KEYS = {"seconds", "samples_per_s", "probe_seconds"}


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _comparable(path: Path):
    if path.suffix == ".json":
        return _without_timing(json.loads(path.read_text()))
    if path.name == "report.md":
        return re.sub(r"[\d.]+ samples/s", "N samples/s", re.sub(r"steps in [\d.]+ s", "steps in N s", path.read_text()))
    if path.name == "samples_per_s.tsv":
        return [line.split("\t")[0] for line in path.read_text().splitlines()]  # the steps, not the speeds
    if path.name == "checkpoint.pt":
        # everything but the process's Python and NumPy generators, which nothing seeds or draws from
        state = torch.load(path, weights_only=False)
        return {k: v for k, v in state.items() if k != "rng" and k not in TIMING_KEYS}, [{k: v for k, v in r.items() if k not in ("python", "numpy")}
                                                                 for r in state["rng"]]
    return path.read_bytes()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _output_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for d in ("data", "models", "results") for p in (root / d).rglob("*")
            if p.is_file() and p.name != ".snakemake_timestamp"}


@pytest.mark.slow
def test_snakemake_produces_the_same_outputs_as_dvc(dvc_copy, snakemake_copy):
    dvc_root, smk_root = dvc_copy[0], snakemake_copy[0]
    files = _output_files(dvc_root)
    assert files == _output_files(smk_root)
    assert {"models/pretrain/context/model.safetensors", "models/pretrain/target/config.json",
            "results/report.md", "results/summary.json", "results/finetune/synth/predictions.csv",
            "results/finetune/words/predictions.csv", "results/finetune/synth/confusion.csv",
            "results/finetune/words/per_class_ap.csv", "data/features/words/index.csv", "data/pool/words.json",
            "results/plots/learning_curve/synth.png", "results/plots/learning_curve/words.csv"} <= files
    for name in sorted(files):
        a, b = _comparable(dvc_root / name), _comparable(smk_root / name)
        assert _equal(a, b), name
    # and Snakemake finds nothing left to do
    assert "Nothing to be done" in run(["snakemake", "--cores", "2", "--dry-run"], smk_root).stdout


@pytest.mark.slow
def test_slurm_profile_submits_pretraining_to_several_gpus_under_torchrun(snakemake_copy):
    root, _ = snakemake_copy
    out = run(["snakemake", "--profile", "workflow/profiles/slurm", "--dry-run", "--forceall"], root).stdout
    jobs = {j["rule"]: j for j in parse_dry_run(out)}
    resources = {rule: dict(kv.split("=", 1) for kv in j["resources"].split(", ")) for rule, j in jobs.items()}
    pretrain = resources["pretrain"]
    assert (pretrain["gpu"], pretrain["cpus_per_task"]) == ("8", "64")
    assert int(pretrain["mem_mb"]) > 0 and int(pretrain["runtime"]) > 0
    assert resources["finetune"]["gpu"] == resources["linear"]["gpu"] == "1"
    shell = jobs["pretrain"]["shell"]
    assert shell.startswith("torchrun --standalone --nproc_per_node 8 --no-python ajepa pretrain")
    assert shell.endswith(f"--no-python ajepa pretrain 2> {jobs['pretrain']['log']}")  # dvc.yaml's command
    # the sbatch line the plugin builds from these resources
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources({k: int(v) for k, v in pretrain.items() if v.isdigit()}), threads=1,
                          name="pretrain", wildcards={})
    sbatch = get_submit_command(job, dict(run_uuid="u", slurm_logfile="l", comment_str="rule_pretrain", account="",
                                          partition="", workdir=str(root))) + set_gres_string(job)
    assert "--gpus=8" in sbatch and "--cpus-per-task=64" in sbatch
    assert f"--mem {pretrain['mem_mb']}" in sbatch and f"-t {pretrain['runtime']}" in sbatch


@pytest.mark.slow
def test_snakemake_lint_is_clean(snakemake_copy):
    root, _ = snakemake_copy
    r = run(["snakemake", "--lint"], root)  # exits 1 on any lint
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr


@pytest.mark.slow
def test_dvc_commit_adopts_a_snakemake_run(snakemake_copy):
    """What docs/pipeline.md says to run after Snakemake: DVC then sees the pipeline as up to date."""
    root, _ = snakemake_copy
    run(["dvc", "commit", "--force"], root)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root).stdout


@pytest.mark.slow
def test_one_benchmark_linear_probe_reruns_alone(dvc_copy):
    """`dvc repro linear@synth` after a probe setting changed: that stage runs, nothing upstream does,
    and its metrics follow the new setting. The workspace is put back as it was."""
    root, _ = dvc_copy
    before = json.loads((root / "results/linear/synth/metrics.json").read_text())
    try:
        _set_params(root, lambda p: p["linear"].update(l2=[10.0]))
        r = run(["dvc", "repro", "linear@synth"], root)
        out = r.stdout + r.stderr
        assert "Running stage 'linear@synth'" in out
        ran = set(re.findall(r"Running stage '([^']+)'", out))
        assert ran == {"check", "linear@synth"}, ran
        after = json.loads((root / "results/linear/synth/metrics.json").read_text())
        assert all(run_["l2"] == 10.0 for run_ in after["linear"]["runs"])
        timing = json.loads((root / "logs/timing/linear-synth.json").read_text())  # seconds live apart
        assert timing.keys() == {k for k, row in after.items() if isinstance(row, dict) and "runs" in row}
        assert all(row["seconds"] >= 0 for row in timing.values())
        assert after["linear"]["runs"] != before["linear"]["runs"]
        stages = set(re.findall(r"^(\S+):$", run(["dvc", "status"], root).stdout, re.M))
        # the other benchmark's probe reads the same `linear` section; the report is downstream of both
        assert stages == {"linear@words", "report"}
    finally:
        run(["git", "checkout", "params.yaml"], root)
        run(["dvc", "repro", "linear@synth"], root)
    assert _without_timing(json.loads((root / "results/linear/synth/metrics.json").read_text())) == _without_timing(before)


@pytest.mark.slow
def test_the_probe_at_every_depth_ends_at_the_stages_rows(dvc_copy):
    """`ajepa bench layers`: a row per depth for the pretrained encoder and its random init; its last depth
    through the final norm is what `ajepa linear` probes, so the three rows the stage also reports (the
    encoder, its random init, the fbank) are the stage's own numbers."""
    root, _ = dvc_copy
    before = run(["git", "status", "--porcelain"], root).stdout
    out = json.loads(run(["ajepa", "bench", "layers", "synth", "--json"], root).stdout)
    stage = json.loads((root / "results/linear/synth/metrics.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    depth = params["pretrain"]["encoder"]["depth"]
    assert list(out["layers"]) == ["0 patches", *map(str, range(1, depth + 1)), f"{depth} + norm", "mean of blocks"]
    last = out["layers"][f"{depth} + norm"]
    assert last["pretrained"] == stage["linear"]["accuracy"]
    assert last["random_init"] == stage["linear_random_init"]["accuracy"]
    assert out["fbank_baseline"] == stage["fbank_baseline"]["accuracy"]
    assert out["encoder"] == stage["encoder"] and out["runs"] == params["datasets"]["synth"]["prepare"]["num_folds"]
    assert all(0 <= v <= 100 for row in out["layers"].values() for v in row.values())
    assert run(["git", "status", "--porcelain"], root).stdout == before  # it writes nothing
    text = run(["ajepa", "bench", "layers", "synth"], root).stdout
    assert "0 patches" in text and "fbank" in text
