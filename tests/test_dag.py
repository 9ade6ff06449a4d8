"""`ajepa dag --check`: dvc.yaml and the Snakefile describe the same pipeline."""

import ast
import re

import pytest

from ajepa.dag import Pipeline, Stage, _edges, compare, normalise_command, persistent_outputs, resolve_dvc_yaml
from conftest import REPO, load_repo_params, make_project_copy, run


def test_command_normalisation():
    assert normalise_command("torchrun --standalone --nproc_per_node 8 --no-python ajepa pretrain 2> logs/p.log",
                             ["logs/p.log"]) == ["ajepa", "pretrain"]
    # a redirect anywhere but the job's declared log is part of the command
    assert normalise_command("ajepa pretrain 2> other.log", ["logs/p.log"]) == ["ajepa", "pretrain", "2>", "other.log"]
    # torchrun running a Python file is a different command, not a launcher around ours
    assert normalise_command("torchrun --nproc_per_node 2 train.py")[0] == "torchrun"


def _pipeline(tool, stages):
    stages = {s.name: s for s in stages}
    return Pipeline(tool, stages, _edges(stages))


def _stages(pretrain_outs=("models/pretrain/encoder.safetensors",), persist=(), report_deps=("ajepa/stages/report.py",),
            report_cmd="ajepa report"):
    return [
        Stage("features@synth", ["ajepa", "features", "synth"], deps={"ajepa/data/store.py"},
              outs={"data/features/synth"}),
        Stage("pretrain", ["ajepa", "pretrain"], deps={"data/features/synth", "ajepa/masks.py"},
              outs=set(pretrain_outs), persist=set(persist)),
        Stage("report", report_cmd.split(), deps={"models/pretrain/encoder.safetensors", *report_deps},
              outs={"results/report.md"}),
    ]


def test_compare_accepts_persistent_state_only_in_dvc():
    state = "models/pretrain_state"
    dvc = _pipeline("dvc.yaml", _stages(pretrain_outs=("models/pretrain/encoder.safetensors", state), persist=[state]))
    smk = _pipeline("Snakefile", _stages())
    assert compare(dvc, smk, ["synth"]) == []


def test_compare_names_every_difference():
    state = "models/pretrain_state"
    dvc = _pipeline("dvc.yaml", _stages(pretrain_outs=("models/pretrain/encoder.safetensors", state, "extra.png")))
    smk = _pipeline("Snakefile", _stages(pretrain_outs=("models/pretrain/encoder.safetensors", state),
                                         report_deps=("ajepa/stages/report.py", "ajepa/plots.py"),
                                         report_cmd="ajepa report --fast"))
    diffs = compare(dvc, smk, ["synth"])
    assert "stage pretrain: output extra.png only in dvc.yaml" in diffs
    assert any("models/pretrain_state" in d and "persist: true" in d for d in diffs)
    assert any("models/pretrain_state" in d and "must not be a Snakemake output" in d for d in diffs)
    assert "stage report: input ajepa/plots.py only in the Snakefile" in diffs
    assert any(d.startswith("stage report: command `ajepa report`") for d in diffs)


def test_compare_edges_and_stages():
    dvc = _pipeline("dvc.yaml", _stages())
    smk_stages = _stages()
    smk_stages[2].deps.discard("models/pretrain/encoder.safetensors")  # report no longer needs pretrain
    smk_stages.append(Stage("extra", ["ajepa", "extra"]))
    diffs = compare(dvc, _pipeline("Snakefile", smk_stages), ["synth"])
    assert "edge pretrain -> report: only in dvc.yaml" in diffs
    assert any(d.startswith("stage extra: only in the Snakefile") for d in diffs)


def test_persistent_outputs_follow_the_benchmarks():
    allowed = persistent_outputs(["esc50", "spc2"])
    assert {"models/finetune_state/esc50", "data/embeddings/spc2", "results/finetune/esc50/live",
            "models/pretrain_state", "results/pretrain/live/plots/metrics"} <= set(allowed)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project_copy(tmp_path_factory.mktemp("dag"), load_repo_params())


def test_repository_dag_agrees(project):
    r = run(["ajepa", "dag", "--check"], project)
    assert "agree: 12 stages, 19 edges" in r.stdout  # prepare, features, pool x 2 datasets; linear, finetune x 2
    table = run(["ajepa", "dag"], project).stdout
    assert re.search(r"^finetune@synth\s+ajepa finetune synth\s+<- features@synth, pretrain$", table, re.M)


def test_altered_copy_fails_the_check(project, tmp_path):
    altered = make_project_copy(tmp_path / "altered", load_repo_params())
    rules = altered / "workflow/rules/downstream.smk"
    text = rules.read_text()
    text = text.replace('"ajepa finetune {wildcards.bench} 2> {log}"', '"ajepa finetune {wildcards.bench} --x 2> {log}"')
    report = text.index("rule report:")  # the report rule forgets a source file
    text = text[:report] + text[report:].replace('        "ajepa/plots.py",\n', "", 1)
    rules.write_text(text)
    dvc_yaml = altered / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "        - data/embeddings/${item}:\n            persist: true\n", "        - data/embeddings/${item}:\n"))
    r = run(["ajepa", "dag", "--check"], altered, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage finetune@synth: command `ajepa finetune synth` in dvc.yaml" in r.stderr
    assert "stage report: input ajepa/plots.py only in dvc.yaml" in r.stderr
    assert "stage linear@synth: output data/embeddings/synth" in r.stderr and "persist: true" in r.stderr
    assert "differ in 5 place(s)" in r.stderr  # finetune and linear of both benchmarks, and the report


def test_dag_refuses_what_it_cannot_resolve(project, tmp_path):
    altered = make_project_copy(tmp_path / "matrix", load_repo_params())
    dvc_yaml = altered / "dvc.yaml"
    text = dvc_yaml.read_text()
    start, end = text.index("  linear:\n"), text.index("  finetune:\n")
    head, body = text[start:end].replace("${item}", "${item.bench}").split("    do:\n")
    head = head.replace("    foreach: ${pipeline.benchmarks}\n", "    matrix:\n      bench: ${pipeline.benchmarks}\n")
    body = "".join(line[2:] if line.startswith("  ") else line for line in body.splitlines(keepends=True))
    dvc_yaml.write_text(text[:start] + head + body + text[end:])
    assert "linear@synth" in run(["dvc", "stage", "list", "--name-only"], altered).stdout  # valid for DVC
    r = run(["ajepa", "dag", "--check"], altered, check=False)
    assert r.returncode == 2 and "`matrix` is not resolved" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# Modules that decide how parameters are read, where and how files are written and how progress
# is shown, not what a stage computes: depending on them would rerun the whole pipeline on any edit.
INFRASTRUCTURE = {"ajepa/config.py", "ajepa/errors.py", "ajepa/atomic.py", "ajepa/paths.py", "ajepa/progress.py"}


# Imported but not run by the stage: the feature store imports manifest.STATS_SPLITS for extraction
# (features@ depends on it); reading a store never uses it.
NOT_READ = {stage: {"ajepa/data/manifest.py"} for stage in ("pool", "pretrain", "linear", "finetune")}


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
    deps = resolve_dvc_yaml(REPO)[stage].deps
    used = _closure(REPO / "ajepa" / "stages" / f"{stage.split('@')[0]}.py")
    missing = sorted(m for m in used - INFRASTRUCTURE - NOT_READ.get(stage.split("@")[0], set())
                     if not _package_marker(REPO / m) and not any(m == d or m.startswith(d + "/") for d in deps))
    assert not missing, f"{stage} imports {missing} but does not depend on them"
