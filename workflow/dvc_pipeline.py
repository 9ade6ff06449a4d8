"""dvc.yaml as Snakemake needs it (workflow/rules/dvc.smk). Plain Python: no Snakemake objects.

DVC resolves dvc.yaml against params.yaml (foreach items, ${...} keys); these functions turn its
stages into what Snakemake rules need. What differs between the two, on purpose:
- DVC's `persist: true` outputs (resumable state, curves a resumed run appends to, the embedding
  cache) are not Snakemake outputs: Snakemake deletes a job's declared outputs before running it,
  which would throw away what an interrupted run resumes from. A stage that reads one depends on
  the producing stage's other outputs instead.
- A dependency on a folder that holds other stages' outputs (results/linear, data/pool) is a
  dependency on those outputs: Snakemake matches inputs to outputs by name.
- A foreach stage NAME@ITEM is one rule NAME with an {item} wildcard: its outputs are the resolved
  paths with the item's path component written as {item}, the same for every item.
"""

from collections import defaultdict
from pathlib import PurePosixPath


def dvc_stages(root) -> dict:
    """{"NAME@ITEM" or "NAME": dict(cmd, deps, params, outs, persist)} in dvc.yaml order."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            is_param = [type(d).__name__ == "ParamsDependency" for d in s.deps]
            out[s.name] = dict(
                cmd=s.cmd, params=[k for d, p in zip(s.deps, is_param) if p for k in d.params],
                deps=[d.def_path for d, p in zip(s.deps, is_param) if not p],
                outs=[o.def_path for o in s.outs if not o.persist],
                persist=[o.def_path for o in s.outs if o.persist])
    return out


def groups(stages: dict) -> dict[str, list[str]]:
    """NAME -> [ITEM, ...] of its foreach items ([] for a plain stage), in dvc.yaml order."""
    out = defaultdict(list)
    for address in stages:
        name, _, item = address.partition("@")
        out[name] += [item] if item else []
    return dict(out)


def _inside(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def inputs(stages: dict, deps: list[str]) -> list[str]:
    """A stage's dependencies as Snakemake inputs (see the module docstring)."""
    out = []
    for dep in deps:
        produced = [p for s in stages.values() for p in s["outs"] if _inside(p, dep)]
        persistent = [s for s in stages.values() if any(_inside(dep, p) or _inside(p, dep) for p in s["persist"])]
        out += produced or [p for s in persistent for p in s["outs"]] or [dep]
    return out


def with_wildcard(path: str, item: str) -> str:
    """The path with its component ITEM (or ITEM.EXT) written as {item}."""
    parts = PurePosixPath(path).parts
    return str(PurePosixPath(*("{item}" + p[len(item):] if p == item or p.startswith(f"{item}.") else p
                               for p in parts)))


def output_patterns(stages: dict, name: str, items: list[str]) -> list[str]:
    """The outputs of NAME@ITEM with the item as {item}: one pattern list for every item, or an error."""
    patterns = {tuple(with_wildcard(p, i) for p in stages[f"{name}@{i}"]["outs"]) for i in items}
    if len(patterns) != 1:
        raise ValueError(f"dvc.yaml: the outputs of {name}@ITEM do not follow one pattern: {sorted(patterns)}")
    return list(patterns.pop())


def is_folder(path: str) -> bool:
    """dvc.yaml names files with a suffix and folders without one (data/raw/synth, results/plots)."""
    return not PurePosixPath(path).suffix


def param_value(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params
