"""The Snakefile is read from dvc.yaml (workflow/dvc_pipeline.py): the mapping, the jobs it gives, and
that every stage depends on the code it runs."""

import ast
import sys

import pytest
from conftest import REPO, load_repo_params, make_project_copy, parse_dry_run, run

sys.path.insert(0, str(REPO / "workflow"))
import dvc_pipeline as dvcp  # noqa: E402

STAGES = dvcp.dvc_stages(REPO)


def test_foreach_outputs_become_wildcard_patterns():
    assert dvcp.with_wildcard("data/raw/synth", "synth") == "data/raw/{item}"
    assert dvcp.with_wildcard("data/manifests/synth.missing.csv", "synth") == "data/manifests/{item}.missing.csv"
    assert dvcp.with_wildcard("ajepa/data/synthetic.py", "synth") == "ajepa/data/synthetic.py"  # whole components only
    stages = {"p@a": {"outs": ["x/a/out.json"]}, "p@b": {"outs": ["x/b/out.json"]},
              "q@a": {"outs": ["x/a.json"]}, "q@b": {"outs": ["y/b.json"]}}
    assert dvcp.output_patterns(stages, "p", ["a", "b"]) == ["x/{item}/out.json"]
    with pytest.raises(ValueError, match="do not follow one pattern"):
        dvcp.output_patterns(stages, "q", ["a", "b"])


def test_folder_and_persistent_dependencies_become_the_outputs_behind_them():
    stages = {"linear@a": {"outs": ["results/linear/a/metrics.json"], "persist": ["data/embeddings/a"]},
              "pretrain": {"outs": ["models/enc.safetensors", "results/pretrain/metrics.json"],
                           "persist": ["results/pretrain/live/plots/metrics"]}}
    deps = ["results/linear", "results/pretrain/live/plots/metrics", "ajepa/stages/report.py"]
    assert dvcp.inputs(stages, deps) == ["results/linear/a/metrics.json", "models/enc.safetensors",
                                         "results/pretrain/metrics.json", "ajepa/stages/report.py"]
    assert dvcp.is_folder("data/raw/synth") and not dvcp.is_folder("results/report.md")


@pytest.mark.slow
def test_snakemake_runs_every_dvc_stage_with_its_command_and_outputs(tmp_path):
    root = make_project_copy(tmp_path / "copy", load_repo_params())
    out = run(["snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "1", "--nocolor"], root).stdout
    jobs = [j for j in parse_dry_run(out) if j["rule"] != "all"]
    dvc = dvcp.dvc_stages(root)
    assert len(jobs) == len(dvc) == 13  # check; prepare, features, pool x 2 datasets; linear, finetune x 2; pretrain, report
    for job in jobs:
        item = job.get("wildcards", "").removeprefix("item=")
        stage = dvc[f"{job['rule']}@{item}" if item else job["rule"]]
        assert job["shell"] == f"{stage['cmd']} 2> {job['log']}"
        assert set(job["output"].split(", ")) == set(stage["outs"])
        assert not set(stage["persist"]) & set(job["output"].split(", "))  # resumable state is DVC's only


@pytest.mark.slow
def test_snakemake_refuses_parameters_that_params_yaml_does_not_hold(tmp_path):
    root = make_project_copy(tmp_path / "copy", load_repo_params())
    r = run(["snakemake", "--dry-run", "--cores", "1", "--configfile", "presets/paper.yaml"], root, check=False)
    assert r.returncode != 0 and "changes parameters that every `ajepa` command reads from params.yaml" in r.stdout + r.stderr


# Modules that decide how parameters are read, where and how files are written, how progress is
# shown and how many cores run it, not what a stage computes: depending on them would rerun the
# whole pipeline on any edit. The vocabularies params.yaml chooses from (choices.py) were config.py's;
# a new word comes with the code that implements it, in a module the stage depends on. The package's
# __init__ holds the version and imports `load_encoder` on first use, for users. The run's guards are
# infrastructure too: the state-folder lock, the signal handling and the finiteness checks stop a run
# or let it go on, and never change what it computes.
INFRASTRUCTURE = {"ajepa/__init__.py", "ajepa/config.py", "ajepa/choices.py", "ajepa/errors.py", "ajepa/atomic.py",
                  "ajepa/paths.py", "ajepa/progress.py", "ajepa/cpus.py", "ajepa/lock.py", "ajepa/interrupt.py",
                  "ajepa/train/finite.py"}


# Imported but not run by the stage: the feature store imports manifest.STATS_SPLITS for extraction
# (features@ depends on it) and the loader its label separator; reading a store never uses the former,
# and the latter is the manifest's format, not code that runs.
NOT_READ = {stage: {"ajepa/datasets/manifest.py"} for stage in ("pool", "pretrain", "linear", "finetune")}


def _package_marker(path) -> bool:
    """An __init__.py holding only a docstring (and a version string)."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, (ast.Expr, ast.Assign)) for n in body)


def _module_file(name: str):
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path) -> set:
    """Files of the ajepa modules `path` imports (absolute and relative, at any depth in the file)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {f for n in names if n.startswith("ajepa") and (f := _module_file(n)) is not None}
    return found


def _closure(path) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            # what config.py imports (the registry and checksum parser, to validate params) is how
            # parameters are read, like config.py itself, not what the stage computes
            if p.relative_to(REPO).as_posix() not in INFRASTRUCTURE:
                todo += _imports(p)
    return {p.relative_to(REPO).as_posix() for p in seen}


@pytest.mark.parametrize("stage", ["prepare@synth", "features@synth", "pool@synth", "pretrain", "linear@synth",
                                   "finetune@synth", "report"])
def test_stage_code_deps_cover_what_the_stage_imports(stage):
    """Editing any module a stage runs reruns that stage (dvc.yaml deps; the parity check extends this
    to the Snakefile)."""
    deps = STAGES[stage]["deps"]
    used = _closure(REPO / "ajepa" / "stages" / f"{stage.split('@')[0]}.py")
    missing = sorted(m for m in used - INFRASTRUCTURE - NOT_READ.get(stage.split("@")[0], set())
                     if not _package_marker(REPO / m) and not any(m == d or m.startswith(d + "/") for d in deps))
    assert not missing, f"{stage} imports {missing} but does not depend on them"
