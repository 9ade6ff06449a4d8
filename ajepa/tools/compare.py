"""`ajepa compare`: the experiments of `dvc exp show` as one readable table.

One row per commit and experiment: its name, the params.yaml keys it changed (against the commit it
was run from) and, per benchmark, the headline metric of the linear probe and of fine-tuning from
results/summary.json (the benchmark's own metric: accuracy or mAP). A value averaged over fewer
protocol runs than the benchmark has (a fine-tuning budget, e.g. fold 1 of 5) carries a `*`. The
table fits `width` columns: a long list of changes is cut, never a number.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field

from ajepa.errors import AjepaError

SUMMARY = "results/summary.json"
PARAMS = "params.yaml"
HEADLINE = ("linear", "finetune")  # the A-JEPA rows of each benchmark, in this order
NAME_WIDTH = 16


@dataclass
class Row:
    name: str
    changes: str  # "key=value ..." against the row's baseline, or what the row is
    scores: dict[str, str] = field(default_factory=dict)  # benchmark -> "linear finetune"


def flatten(tree, prefix: str = "") -> dict:
    """{"a.b.c": value} of a nested mapping; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value) -> str:
    return json.dumps(value, separators=(",", ":")).strip('"') if not isinstance(value, str) else value


def _file_data(rev: dict, kind: str, path: str) -> dict:
    return ((rev.get("data") or {}).get(kind) or {}).get(path, {}).get("data") or {}


def summary_of(rev: dict) -> dict:
    """The results/summary.json of one `dvc exp show --json` revision ({} when it has none)."""
    return _file_data(rev, "metrics", SUMMARY)


def experiments(shown: list):
    """(name, revision) of every experiment in `dvc exp show --json` output (commits and workspace left out)."""
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield rev.get("name") or exp.get("name") or rev["rev"][:7], rev


def _score(row: dict) -> str:
    """The headline number of one summary row (its first key: the benchmark's metric), starred when partial."""
    if not row:
        return "-"
    metric = next(iter(row))
    return f"{row[metric]:.1f}" + ("*" if "runs" in row else "")


def make_row(rev: dict, name: str, baseline: dict | None) -> Row:
    """One table row of a `dvc exp show --json` revision; `baseline` is the flat params of its commit
    (None for a commit row, which shows what it is)."""
    error = rev.get("error")
    if error:  # DVC's {"type": ..., "msg": ...} of a revision it could not read
        return Row(name, f"failed: {error.get('msg', error) if isinstance(error, dict) else error}")
    params = flatten(_file_data(rev, "params", PARAMS))
    if baseline is None:
        changes = "(commit)"
    else:
        changed = {k: v for k, v in params.items() if baseline.get(k) != v}
        changed.update({k: None for k in baseline if k not in params})
        changes = " ".join(f"{k}={_show(v)}" for k, v in changed.items()) or "(no change)"
    summary = summary_of(rev)
    return Row(name, changes, {bench: " ".join(_score(rows.get(m, {})) for m in HEADLINE)
                               for bench, rows in summary.items() if isinstance(rows, dict)})


def table_rows(shown: list) -> list[Row]:
    """The rows of `dvc exp show --json` output: each commit, then its experiments (the workspace first,
    against the first commit)."""
    commits = [e for e in shown if e.get("rev") != "workspace"]
    head = flatten(_file_data(commits[0], "params", PARAMS)) if commits else {}
    rows = []
    for entry in shown:
        if entry.get("rev") == "workspace":
            rows.append(make_row(entry, "workspace", head))
            continue
        rows.append(make_row(entry, entry.get("name") or entry["rev"][:7], None))
        base = flatten(_file_data(entry, "params", PARAMS))
        rows += [make_row(rev, name, base) for name, rev in experiments([entry])]
    return rows


def render(rows: list[Row], width: int = 120) -> str:
    """The table, every line at most `width` characters; a footnote for starred values."""
    benches = list(dict.fromkeys(b for r in rows for b in r.scores))
    cells = [f"{b} {'/'.join(h[:3] for h in HEADLINE)}" for b in benches]
    col = max([11, *map(len, cells)])
    room = width - NAME_WIDTH - 2 - (col + 2) * len(benches)
    if room < 12:
        raise AjepaError(f"{len(benches)} benchmarks do not fit {width} columns (--width)")

    def line(name: str, changes: str, scores: list[str]) -> str:
        changes = changes if len(changes) <= room else changes[:room - 3] + "..."
        name = name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 1] + "~"
        return f"{name:<{NAME_WIDTH}}  {changes:<{room}}" + "".join(f"  {s:>{col}}" for s in scores)

    out = [line("experiment", "params changed", cells)]
    out += [line(r.name, r.changes, [r.scores.get(b, "-") for b in benches]) for r in rows]
    if any("*" in s for r in rows for s in r.scores.values()):
        out.append("* over fewer protocol runs than the benchmark has (summary.json: `runs`, e.g. fold1 of 5)")
    return "\n".join(s.rstrip() for s in out)


def run(width: int = 120) -> str:
    """`dvc exp show --json` in the current repository, as the table."""
    return render(table_rows(show()), width)


def show() -> list:
    """`dvc exp show --json` of the current repository, parsed."""
    try:
        r = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    except FileNotFoundError:
        raise AjepaError("dvc: not found (install the pipeline tools: pip install -e '.[pipeline]')") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise AjepaError(f"dvc exp show failed: {last}")
    return json.loads(r.stdout)
