"""`ajepa dag`: the pipeline as DVC and as Snakemake see it, and the check that the two are the same.

Both views come from the tools, run as subprocesses in the project directory (nothing here
imports DVC or Snakemake):

- DVC: stage names and edges from `dvc dag --dot`, commands from `dvc repro --dry --force`;
  per-stage deps and outs from dvc.yaml, resolved against params.yaml here (`foreach` over a
  list, `${item}` and `${dotted.key}`: what our dvc.yaml uses; anything else is refused) and
  cross-checked against the names, commands and edges DVC printed, so a resolution that
  disagrees with DVC stops the check instead of comparing the wrong thing.
- Snakemake: every job of `snakemake --dry-run --forceall --printshellcmds` (rule, wildcards,
  input, output, log, shell command) and the rule names of `snakemake --list-rules`.

"The same" means, stage by stage:

1. stages: DVC's `NAME` / `NAME@ITEM` are Snakemake's jobs `RULE` / `RULE@VALUE` (a rule with
   one wildcard); rules without a command that only collect targets (`all`) are not stages;
2. commands: equal token lists (shlex) after two normalisations: a leading launcher
   `torchrun ... --no-python` is dropped (Snakemake wraps multi-GPU pretraining in torchrun;
   the command it launches must be DVC's), and so is a trailing `2> LOG` that sends stderr to
   the job's declared log (Snakemake keeps cluster logs; DVC prints to the terminal);
3. edges: A -> B when B reads a path that A writes (the same path, or one inside the other);
4. outputs: the same paths, except the DVC-only persistent outputs of `persistent_outputs()`,
   which must be `persist: true` in dvc.yaml and must NOT be Snakemake outputs (Snakemake
   deletes a job's declared outputs before running it, which would throw away the state a
   resumed run needs);
5. source inputs: the deps that no stage writes (code, external data) are the same.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ajepa import paths
from ajepa.config import read_yaml
from ajepa.errors import AjepaError

TARGET_RULES = {"all"}  # Snakemake rules that only name the final targets: not pipeline stages


def persistent_outputs(benchmarks: list[str]) -> dict[str, str]:
    """DVC-only outputs: resumable state and files a resumed run appends to. Path -> why."""
    out = {
        paths.pretrain_state_dir().as_posix(): "resumable pretraining checkpoint",
        (paths.pretrain_live_dir() / "plots" / "metrics").as_posix(): "pretraining curves, appended on resume",
    }
    for b in benchmarks:
        out[paths.finetune_state_dir(b).as_posix()] = "resumable fine-tuning runs"
        out[(paths.finetune_results(b) / "live").as_posix()] = "fine-tuning curves, appended on resume"
        out[paths.embeddings_dir(b).as_posix()] = "embedding cache of the linear probe"
    return out


@dataclass
class Stage:
    name: str
    cmd: list[str]  # normalised tokens
    deps: set[str] = field(default_factory=set)
    outs: set[str] = field(default_factory=set)
    persist: set[str] = field(default_factory=set)  # outs declared persist: true (DVC only)
    raw_cmd: str = ""


@dataclass
class Pipeline:
    tool: str
    stages: dict[str, Stage]
    edges: set[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# running the tools


def _tool(cmd: list[str], root: Path) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise AjepaError(f"`{cmd[0]}` not found on PATH (activate the project's .venv)")
    r = subprocess.run([exe, *cmd[1:]], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        msg = " ".join((r.stderr.strip() or r.stdout.strip()).split())[:600]
        raise AjepaError(f"`{' '.join(cmd)}` failed in {root}: {msg}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# DVC


def _interpolate(value: Any, ctx: dict, where: str) -> Any:
    if isinstance(value, dict):
        return {_interpolate(k, ctx, where): _interpolate(v, ctx, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, ctx, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = re.fullmatch(r"\$\{\s*([^}]+?)\s*\}", value)
    if whole:  # DVC keeps the type of a value that is one whole ${...}
        return _lookup(whole.group(1), ctx, where)
    return re.sub(r"\$\{\s*([^}]+?)\s*\}", lambda m: str(_lookup(m.group(1), ctx, where)), value)


def _lookup(key: str, ctx: dict, where: str) -> Any:
    value: Any = ctx
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise AjepaError(f"dvc.yaml: {where}: ${{{key}}} does not resolve against params.yaml")
        value = value[part]
    return value


def _entries(items: list | None, where: str) -> list[tuple[str, dict]]:
    out = []
    for item in items or []:
        if isinstance(item, str):
            out.append((_norm(item), {}))
        elif isinstance(item, dict) and len(item) == 1:
            (path, flags), = item.items()
            out.append((_norm(path), flags or {}))
        else:
            raise AjepaError(f"dvc.yaml: {where}: cannot read entry {item!r}")
    return out


def resolve_dvc_yaml(root: Path) -> dict[str, Stage]:
    """The stages of root/dvc.yaml with `foreach` and `${...}` resolved against root/params.yaml."""
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
        params = read_yaml((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AjepaError(f"{root}: cannot read dvc.yaml and params.yaml: {' '.join(str(e).split())}") from None
    if "vars" in spec:
        raise AjepaError("dvc.yaml: top-level `vars` is not resolved by `ajepa dag` (params.yaml only)")
    stages: dict[str, Stage] = {}
    for name, body in (spec.get("stages") or {}).items():
        if "matrix" in body:
            raise AjepaError(f"dvc.yaml: stage {name}: `matrix` is not resolved by `ajepa dag`")
        if "foreach" in body:
            items = _interpolate(body["foreach"], params, name)
            if not isinstance(items, list):
                raise AjepaError(f"dvc.yaml: stage {name}: `foreach` over {type(items).__name__}: "
                                 f"only lists are resolved by `ajepa dag`")
            for item in items:
                stages[f"{name}@{item}"] = _dvc_stage(f"{name}@{item}", body["do"], {**params, "item": item})
        else:
            stages[name] = _dvc_stage(name, body, params)
    return stages


def _dvc_stage(name: str, body: dict, ctx: dict) -> Stage:
    body = _interpolate(body, ctx, name)
    if not isinstance(body.get("cmd"), str):
        raise AjepaError(f"dvc.yaml: stage {name}: `cmd` must be one command string")
    outs = _entries(body.get("outs"), name) + _entries(body.get("metrics"), name) + _entries(body.get("plots"), name)
    return Stage(name=name, cmd=normalise_command(body["cmd"]), raw_cmd=body["cmd"],
                 deps={p for p, _ in _entries(body.get("deps"), name)}, outs={p for p, _ in outs},
                 persist={p for p, f in outs if f.get("persist")})


def _dot_graph(text: str) -> tuple[list[str], set[tuple[str, str]]]:
    nodes, edges = [], set()
    for line in text.splitlines():
        m = re.fullmatch(r'\s*"([^"]+)"\s*->\s*"([^"]+)"\s*;?\s*', line)
        if m:
            edges.add((m.group(1), m.group(2)))
            continue
        m = re.fullmatch(r'\s*"([^"]+)"\s*;?\s*', line)
        if m:
            nodes.append(m.group(1))
    return nodes, edges


def _dry_commands(text: str) -> dict[str, str]:
    cmds, stage = {}, None
    for line in text.splitlines():
        m = re.match(r"Running stage '([^']+)':", line)
        if m:
            stage = m.group(1)
        elif stage and line.startswith("> "):
            cmds[stage] = line[2:].strip()
            stage = None
    return cmds


def dvc_pipeline(root: Path) -> Pipeline:
    nodes, edges = _dot_graph(_tool(["dvc", "dag", "--dot"], root))
    cmds = _dry_commands(_tool(["dvc", "repro", "--dry", "--force"], root))
    stages = resolve_dvc_yaml(root)
    # the resolution above must describe the pipeline DVC itself sees
    problems = []
    if set(nodes) != set(stages):
        problems.append(f"stages {sorted(set(nodes) ^ set(stages))}")
    for name, st in stages.items():
        if name not in cmds or normalise_command(cmds[name]) != st.cmd:
            problems.append(f"{name} command {cmds.get(name)!r}")
    if set(nodes) == set(stages) and _edges(stages) != edges:
        problems.append(f"edges {sorted(_edges(stages) ^ edges)}")
    if problems:
        raise AjepaError(f"dvc.yaml: `ajepa dag` resolves it differently from DVC ({'; '.join(problems)})")
    return Pipeline("dvc.yaml", stages, edges)


# ---------------------------------------------------------------------------------------------
# Snakemake


def parse_dry_run(text: str) -> list[dict]:
    """Job blocks of `snakemake --dry-run --printshellcmds` (Snakemake 9 layout)."""
    jobs, job = [], None
    for line in text.splitlines():
        m = re.fullmatch(r"(?:local)?rule (\w+):", line.strip()) if not line.startswith("    ") else None
        if m:
            job = {"rule": m.group(1)}
            jobs.append(job)
            continue
        if job is None:
            continue
        if line.startswith("Shell command:"):
            job["shell"] = line.split(":", 1)[1].strip()
            job = None
        elif line.startswith("    ") and ":" in line:
            key, value = line.strip().split(":", 1)
            job[key] = value.strip()
        elif not line.strip():
            job = None
    return jobs


def _split_list(value: str | None) -> list[str]:
    return [_norm(v) for v in (value or "").split(", ") if v.strip()]


def snakemake_pipeline(root: Path) -> Pipeline:
    text = _tool(["snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "1", "--nocolor"], root)
    rules = [line.split()[0] for line in _tool(["snakemake", "--list-rules", "--nocolor"], root).splitlines()
             if line.strip() and not line.startswith((" ", "\t"))]
    jobs = parse_dry_run(text)
    if not jobs:
        raise AjepaError("snakemake --dry-run listed no jobs (is this a Snakemake 9 layout?)")
    stages: dict[str, Stage] = {}
    for job in jobs:
        if job["rule"] in TARGET_RULES:
            continue
        wildcards = [w.split("=", 1)[1] for w in _split_list(job.get("wildcards"))]
        if len(wildcards) > 1:
            raise AjepaError(f"Snakefile: rule {job['rule']} has {len(wildcards)} wildcards; a stage has at most one")
        name = f"{job['rule']}@{wildcards[0]}" if wildcards else job["rule"]
        if "shell" not in job:
            raise AjepaError(f"Snakefile: rule {job['rule']} has no shell command")
        logs = _split_list(job.get("log"))
        stages[name] = Stage(name=name, cmd=normalise_command(job["shell"], logs), raw_cmd=job["shell"],
                             deps=set(_split_list(job.get("input"))), outs=set(_split_list(job.get("output"))))
    covered = {n.split("@")[0] for n in stages} | TARGET_RULES
    for rule in rules:
        if rule not in covered:
            stages[rule] = Stage(name=rule, cmd=[], raw_cmd="(rule with no job in the DAG)")
    return Pipeline("Snakefile", stages, _edges(stages))


# ---------------------------------------------------------------------------------------------
# comparing


def normalise_command(cmd: str, logs: list[str] | tuple = ()) -> list[str]:
    """Tokens of a stage command without a torchrun launcher or a stderr redirect to its log."""
    try:
        tokens = shlex.split(cmd)
    except ValueError as e:
        raise AjepaError(f"cannot split command {cmd!r}: {e}") from None
    if tokens and tokens[0] == "torchrun" and "--no-python" in tokens:
        tokens = tokens[tokens.index("--no-python") + 1:]
    if len(tokens) >= 2 and tokens[-2] == "2>" and _norm(tokens[-1]) in logs:
        tokens = tokens[:-2]
    elif tokens and tokens[-1].startswith("2>") and _norm(tokens[-1][2:]) in logs:
        tokens = tokens[:-1]
    return tokens


def _norm(p: str) -> str:
    return posixpath.normpath(str(p).strip())


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _edges(stages: dict[str, Stage]) -> set[tuple[str, str]]:
    return {(a.name, b.name) for a in stages.values() for b in stages.values()
            if a is not b and any(_overlaps(d, o) for d in b.deps for o in a.outs)}


def _produced(path: str, stages: dict[str, Stage]) -> bool:
    return any(_overlaps(path, o) for s in stages.values() for o in s.outs)


def compare(dvc: Pipeline, smk: Pipeline, benchmarks: list[str]) -> list[str]:
    """Differences between the two pipelines, one line each; empty when they are the same."""
    allowed = persistent_outputs(benchmarks)
    diffs = []
    for name in sorted(set(dvc.stages) - set(smk.stages)):
        diffs.append(f"stage {name}: only in dvc.yaml")
    for name in sorted(set(smk.stages) - set(dvc.stages)):
        diffs.append(f"stage {name}: only in the Snakefile ({smk.stages[name].raw_cmd})")
    for name in sorted(set(dvc.stages) & set(smk.stages)):
        d, s = dvc.stages[name], smk.stages[name]
        if d.cmd != s.cmd:
            diffs.append(f"stage {name}: command `{d.raw_cmd or shlex.join(d.cmd)}` in dvc.yaml, "
                         f"`{s.raw_cmd or shlex.join(s.cmd)}` in the Snakefile")
        for out in sorted(d.outs - s.outs):
            if out not in allowed:
                diffs.append(f"stage {name}: output {out} only in dvc.yaml")
        for out in sorted((d.outs & set(allowed)) - d.persist):
            diffs.append(f"stage {name}: output {out} ({allowed[out]}) must be `persist: true` in dvc.yaml")
        for out in sorted(s.outs - d.outs):
            diffs.append(f"stage {name}: output {out} only in the Snakefile")
        for out in sorted(s.outs & set(allowed)):
            diffs.append(f"stage {name}: {out} ({allowed[out]}) must not be a Snakemake output: Snakemake "
                         f"deletes outputs before a job")
        d_src = {p for p in d.deps if not _produced(p, dvc.stages)}
        s_src = {p for p in s.deps if not _produced(p, smk.stages)}
        for p in sorted(d_src - s_src):
            diffs.append(f"stage {name}: input {p} only in dvc.yaml")
        for p in sorted(s_src - d_src):
            diffs.append(f"stage {name}: input {p} only in the Snakefile")
    common = set(dvc.stages) & set(smk.stages)
    for a, b in sorted(dvc.edges - smk.edges):
        if a in common and b in common:
            diffs.append(f"edge {a} -> {b}: only in dvc.yaml")
    for a, b in sorted(smk.edges - dvc.edges):
        if a in common and b in common:
            diffs.append(f"edge {a} -> {b}: only in the Snakefile")
    return diffs


def check(root: str | Path = ".") -> tuple[Pipeline, list[str]]:
    """(the DVC pipeline, differences from the Snakemake one) for the project at root."""
    root = Path(root)
    dvc = dvc_pipeline(root)
    smk = snakemake_pipeline(root)
    params = read_yaml((root / "params.yaml").read_text())
    return dvc, compare(dvc, smk, list(params["pipeline"]["benchmarks"]))


def describe(p: Pipeline) -> str:
    """One line per stage in DVC's order: name, command, the stages it needs."""
    needs = {n: sorted(a for a, b in p.edges if b == n) for n in p.stages}
    width = max(len(n) for n in p.stages)
    lines = [f"{n:{width}s}  {' '.join(shlex.quote(t) for t in s.cmd)}"
             + (f"   <- {', '.join(needs[n])}" if needs[n] else "") for n, s in p.stages.items()]
    return "\n".join(lines)
