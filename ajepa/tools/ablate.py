"""`ajepa ablate`: the paper's two ablations as DVC experiments, and their table.

(a) masking: pretraining with block masks (I-JEPA's), time-frequency masks, the curriculum from one
to the other (the paper's) and the inverse curriculum, each over `--seeds` pretraining seeds
(`pretrain.seed`); (b) fine-tuning with regularized masking off and at two ratios
(`finetune.BENCH.key_mask_ratio` of every benchmark), each over as many fine-tuning seeds
(`finetune.BENCH.seed`) on the committed run's pretrained encoder, so only fine-tuning reruns.

Every run is one `dvc exp run --queue -n abl-VARIANT-sSEED -S KEY=VALUE ...`: the keys a preset
changes (`--preset`, applied as overrides, so params.yaml is left as it is), then `--set`, the
variant's and the seed's. Every run's settings are validated as the stages read them before anything
is queued. `--table` reads the finished experiments (`dvc exp show --json`, as `ajepa compare` does)
and writes the mean and range over seeds of each benchmark's headline rows (linear probe and
fine-tuned) to results/ablation.md and between the markers of docs/experiments.md.
"""

from __future__ import annotations

import copy
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ajepa import paths
from ajepa.atomic import write_text
from ajepa.choices import MaskMode, names
from ajepa.config import PARAMS_FILE, parse_params, read_yaml
from ajepa.errors import AjepaError, ConfigError
from ajepa.tools import compare
from ajepa.tools.presets import apply_preset, merge

PREFIX = "abl"
DOC_FILE = Path("docs") / "experiments.md"
MARKERS = ("<!-- ablation table (ajepa ablate --table): start -->", "<!-- ablation table: end -->")
RATIOS = (0.0, 0.1, 0.3)  # regularized masking off, the paper's ratio, a stronger one


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # "masking" or "fine-tuning": which stages the runs change
    key: str  # the setting, with BENCH standing for every benchmark
    value: Any
    seed_key: str  # the seed the runs vary, with BENCH as in `key`

    def settings(self, benchmarks: list[str], seed: int) -> dict:
        """{KEY: value} of one run, BENCH spelled out for every benchmark."""
        out = {}
        for key, value in ((self.key, self.value), (self.seed_key, seed)):
            out.update({key.replace("BENCH", b): value for b in benchmarks} if "BENCH" in key else {key: value})
        return out


VARIANTS = {v.name: v for v in [
    *(Variant(f"mask-{m}", "masking", "pretrain.masking.mode", m, "pretrain.seed") for m in names(MaskMode)),
    *(Variant(f"regmask-{r:g}", "fine-tuning", "finetune.BENCH.key_mask_ratio", r, "finetune.BENCH.seed")
      for r in RATIOS)]}


@dataclass(frozen=True)
class Run:
    name: str  # the experiment's name: abl-VARIANT-sSEED
    variant: str
    seed: int
    settings: dict  # KEY: value, in the order given to -S

    def command(self) -> list[str]:
        return ["dvc", "exp", "run", "--queue", "-n", self.name,
                *(a for k, v in self.settings.items() for a in ("-S", f"{k}={override(v)}"))]


def override(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): a string that would read as
    another type, or holds other characters than a plain name's, quoted."""
    if isinstance(value, list):
        return "[" + ",".join(override(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w./-]*", value) and value.lower() not in ("true", "false", "null", "nan",
                                                                                  "inf")
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def parse_set(items: list[str]) -> dict:
    """--set KEY=VALUE items as {KEY: value}, VALUE read as YAML (as -S reads it)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AjepaError(f"--set {item}: not KEY=VALUE")
        out[key] = read_yaml(value, f"--set {item}") if value else None
    return out


def chosen(names: str | None) -> list[Variant]:
    """The variants named (comma-separated names or groups), or all of them."""
    if not names:
        return list(VARIANTS.values())
    picked = []
    for name in (n.strip() for n in names.split(",")):
        group = [v for v in VARIANTS.values() if v.group == name]
        if name not in VARIANTS and not group:
            raise AjepaError(f"--variants {name}: unknown (known: {', '.join(VARIANTS)}; groups: masking, "
                             "fine-tuning)")
        picked += group or [VARIANTS[name]]
    return list(dict.fromkeys(picked))


def nested(settings: dict) -> dict:
    """{"a.b": 1} as {"a": {"b": 1}}."""
    out: dict = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def checked(params: dict, settings: dict, source: str) -> dict:
    """params.yaml with `settings`, validated as the stages read it: an unknown key or a bad value is one line."""
    merged = copy.deepcopy(params)
    merge(merged, nested(settings), source=source)
    parse_params(merged, source=source)
    return merged


def plan(params_file: str | Path, preset: str | None, seeds: int, variants: list[Variant],
         extra: dict) -> list[Run]:
    """Every run of `variants` x seeds 0..seeds-1, each validated."""
    path = Path(params_file)
    try:
        params = read_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root or pass --params)") from None
    base = {c.key: c.new for c in apply_preset(preset, path, dry_run=True)} if preset else {}
    base.update(extra)
    benchmarks = checked(params, base, "ablate --set")["pipeline"]["benchmarks"]
    runs = []
    for v in variants:
        for seed in range(seeds):
            run = Run(f"{PREFIX}-{v.name}-s{seed}", v.name, seed, {**base, **v.settings(benchmarks, seed)})
            checked(params, run.settings, f"ablate {run.name}")
            runs.append(run)
    return runs


def dvc(*args: str) -> subprocess.CompletedProcess:
    """A dvc command; its failure is one line naming it."""
    try:
        r = subprocess.run(["dvc", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise AjepaError("dvc: not found (install the pipeline tools: pip install -e '.[pipeline]')") from None
    if r.returncode != 0:
        last = ((r.stderr + r.stdout).strip().splitlines() or ["(no message)"])[-1]
        raise AjepaError(f"dvc {' '.join(args[:2])} failed: {last}")
    return r


def queue(runs: list[Run]) -> None:
    for run in runs:
        dvc(*run.command()[1:])


def wait(runs: list[Run], poll_s: float = 2.0) -> dict[str, str]:
    """Start one queue worker and wait until none of `runs` is queued or running; {name: final status}."""
    dvc("queue", "start", "-j", "1")
    names = {r.name for r in runs}
    while True:
        status = {}
        for line in dvc("queue", "status").stdout.splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] in names:
                status[parts[1]] = next((p for p in parts if p in ("Queued", "Running", "Success", "Failed")), "?")
        if not any(s in ("Queued", "Running") for s in status.values()):
            return status
        time.sleep(poll_s)


def run(args) -> str:
    """`ajepa ablate`: the table (--table), or the runs printed (--dry-run), queued, or queued and run (--run)."""
    if args.table:
        return write_table()
    runs = plan(args.params or PARAMS_FILE, args.preset, args.seeds, chosen(args.variants), parse_set(args.set or []))
    commands = "\n".join(shlex.join(r.command()) for r in runs)
    if args.dry_run:
        return commands
    queue(runs)
    if not args.run:
        return (f"{commands}\nablate: {len(runs)} runs queued; `dvc queue start -j 1` runs them, then "
                "`ajepa ablate --table`")
    status = wait(runs)
    failed = sorted(r.name for r in runs if status.get(r.name) != "Success")
    status = {n: status.get(n, "not in `dvc queue status`") for n in failed}
    return "\n".join([f"ablate: {len(runs) - len(failed)} of {len(runs)} runs finished", *(
        f"  {n}: {status[n]} (dvc queue logs {n})" for n in failed), write_table()])


def _unfinished(shown: list) -> dict[str, str]:
    """{name: state} of the experiments `dvc exp show --json` reports as queued or running. A running one
    shows the metrics of its workspace copy, which are its commit's until it finishes, not its own."""
    return {exp["name"]: state for entry in shown for exp in entry.get("experiments") or []
            if exp.get("name") and (state := (exp.get("executor") or {}).get("state")) in ("queued", "running")}


def collect(shown: list) -> tuple[dict, list[str]]:
    """({variant: {seed: summary}}, problems) of the ablation experiments in `dvc exp show --json` output;
    an experiment that failed, has no summary or has not finished is a problem line, not a row. A failed
    attempt of a name that was queued again and finished is left out: DVC keeps both under one name."""
    found, problems, finished, unfinished = {}, {}, set(), _unfinished(shown)
    for name, rev in compare.experiments(shown):
        m = re.fullmatch(rf"{PREFIX}-(.+)-s(\d+)", name or "")
        if not m:
            continue
        if name in unfinished:
            problems[name] = f"{name}: {unfinished[name]}, not finished"
            continue
        summary = compare.summary_of(rev)
        if rev.get("error") or not summary:
            why = compare.make_row(rev, name, None).changes if rev.get("error") else "no results/summary.json"
            problems.setdefault(name, f"{name}: {why}")
            continue
        found.setdefault(m.group(1), {})[int(m.group(2))] = summary
        finished.add(name)
    return found, [line for name, line in problems.items() if name not in finished]


def headline(summary: dict, bench: str, method: str) -> float | None:
    """The benchmark's metric (a summary row's first key) of one method, or None."""
    row = summary.get(bench, {}).get(method) if isinstance(summary.get(bench), dict) else None
    value = row[next(iter(row))] if isinstance(row, dict) and row else None
    return float(value) if isinstance(value, (int, float)) else None


def spread(values: list[float]) -> str:
    """mean (min-max) of the seeds' values, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(found: dict, problems: list[str]) -> str:
    """The markdown table: one row per variant, one column per benchmark x {linear probe, fine-tuned}."""
    benches = list(dict.fromkeys(b for runs in found.values() for s in runs.values() for b in s
                                 if isinstance(s[b], dict)))
    columns = [(b, m) for b in benches for m in compare.HEADLINE]
    lines = ["| variant | sets | seeds | " + " | ".join(f"{b} {'linear probe' if m == 'linear' else 'fine-tuned'}"
                                                        for b, m in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for name in [v for v in VARIANTS if v in found] + sorted(set(found) - set(VARIANTS)):
        runs = found[name]
        v = VARIANTS.get(name)
        cells = []
        for b, m in columns:
            values = [headline(s, b, m) for s in runs.values()]
            values = [x for x in values if x is not None]
            cells.append(spread(values) if values else "-")
        sets = f"`{v.key}={v.value}`" if v else ""
        lines.append(f"| {name} | {sets} | {', '.join(map(str, sorted(runs)))} | " + " | ".join(cells) + " |")
    lines += ["", "Mean (min-max) over the seeds of each benchmark's metric (`results/summary.json`; "
                  "accuracy or mAP)."]
    lines += [f"- not in the table: {p}" for p in problems]
    return "\n".join(lines) + "\n"


def write_table(doc: Path = DOC_FILE, out: Path | None = None) -> str:
    """The table of the finished ablation experiments into `out` and between the markers of `doc`."""
    found, problems = collect(compare.show())
    if not found:
        raise AjepaError(f"no finished ablation experiment (named {PREFIX}-VARIANT-sSEED) in `dvc exp show`"
                         + (f"; {len(problems)} failed: " + "; ".join(problems) if problems else ""))
    text = table(found, problems)
    out = out or paths.ablation_table()
    write_text(out, text)
    written = [str(out)]
    if doc.exists():
        written.append(replace_between_markers(doc, text))
    return (f"ablate: {sum(map(len, found.values()))} runs of {len(found)} variants -> {', '.join(written)}"
            + (f"; {len(problems)} left out:\n  " + "\n  ".join(problems) if problems else ""))


def replace_between_markers(doc: Path, text: str) -> str:
    """`doc` with `text` between MARKERS (an error naming the file when they are missing)."""
    content = doc.read_text()
    start, end = content.find(MARKERS[0]), content.find(MARKERS[1])
    if start < 0 or end < start:
        raise AjepaError(f"{doc}: no ablation markers ({MARKERS[0]} ... {MARKERS[1]}): add them where the "
                         "table goes")
    write_text(doc, content[:start + len(MARKERS[0])] + "\n" + text + content[end:])
    return str(doc)
