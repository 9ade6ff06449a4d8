"""`ajepa report`: one table of this run's results (every benchmark x {probes, fine-tuning} with the
random-init and fbank baselines) next to the paper's numbers, the same numbers as JSON, the learning
curve, and plots."""

from __future__ import annotations

import json
import math

from ajepa import paths
from ajepa.atomic import write_csv, write_json, write_text
from ajepa.config import Params
from ajepa.datasets.registry import PAPER_RESULTS
from ajepa.downstream.metrics import SECONDARY
from ajepa.errors import AjepaError
from ajepa.plots import (
    CURVE_SERIES,
    learning_curve_tables,
    learning_curves,
    plot_benchmark_bars,
    plot_learning_curve,
    plot_pretrain_curves,
)
from ajepa.stages.outcome import FAILED
from ajepa.train.schedules import peak_lr

METHODS = {  # summary.json key -> how the report names the row
    "linear": "A-JEPA, linear probe",
    "linear_context_encoder": "A-JEPA context encoder, linear probe",
    "linear_target_encoder": "A-JEPA target encoder, linear probe",
    "linear_random_init": "random-init encoder, linear probe",
    "fbank_baseline": "time-averaged fbank, linear probe",
    "attentive": "A-JEPA, attentive probe",
    "attentive_random_init": "random-init encoder, attentive probe",
    "finetune": "A-JEPA, fine-tuned",
    "finetune_random_init": "random-init encoder, fine-tuned",
}
# What the embedded benchmarks are held to (docs/pipeline.md, "Reading the report"): (row, baseline row, points above it).
# Other benchmarks are held to "above" (0) for the same comparisons.
BARS = {
    "synth": {("linear", "linear_random_init"): 10.0, ("linear", "fbank_baseline"): 3.0,
              ("finetune", "linear"): 0.0, ("finetune", "finetune_random_init"): 10.0},
    "words": {("linear", "linear_random_init"): 5.0, ("linear", "fbank_baseline"): 3.0,
              ("finetune", "linear"): 0.0, ("finetune", "finetune_random_init"): 10.0},
}
DEFAULT_BARS = {("linear", "linear_random_init"): 0.0, ("linear", "fbank_baseline"): 0.0,
                ("finetune", "linear"): 0.0, ("finetune", "finetune_random_init"): 0.0}
# Beside the paper rows: the published figures and this run choose their epoch differently (docs/method.md).
SELECTION_NOTE = ("Model selection differs: AudioMAE's fine-tuning scripts score the test set after every epoch and "
                  "report the best epoch; this run picks its epoch on validation clips or keeps the last "
                  "(`finetune.BENCH.selection`) and scores the test clips once, so a faithful run should land about "
                  "0.1-0.5 points below the paper rows for that alone.")


def _read(path, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object at `path`, with `keys` present; a missing, cut or key-less file is one line."""
    if not path.exists():
        raise AjepaError(f"{path}: not found (run the stage that writes it first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AjepaError(f"{path}: unreadable ({' '.join(str(e).split())}): rerun the stage that writes it") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise AjepaError(f"{path}: no {', '.join(map(repr, missing))} (cut or not this stage's file): rerun the "
                         "stage that writes it")
    return data


def _number(value):
    """A score as JSON can hold it: NaN and infinities (which strict JSON readers refuse) become None."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _stage_rows(path, stage: str) -> tuple[dict, dict, list[str]]:
    """(the file's header {metric, protocol, classes}, {METHOD: its summary row and runs}, problems) of one
    benchmark stage's metrics.json. A missing, cut, key-less or failed file gives no rows and one problem
    naming it; a score that is not a number gives a None (null) and one problem: the report still gets written."""
    try:
        m = _read(path, ("metric", "protocol", "classes"))
    except AjepaError as e:
        failed = _failure(path)
        return {}, {}, [f"{path}: {stage} failed: {failed}" if failed else
                        f"{e} (the {stage} stage failed or has not run: see its log)"]
    head, rows, problems = {k: m[k] for k in ("metric", "protocol", "classes")}, {}, []
    for method in (k for k in METHODS if k in m):
        r = m[method]
        if not isinstance(r, dict) or head["metric"] not in r or not isinstance(r.get("runs"), list):
            problems.append(f"{path}: {method} has no {head['metric']!r} or runs: rerun the {stage} stage")
            continue
        row = {head["metric"]: _number(r[head["metric"]]),
               **{k: _number(r[k]) for k in ("std", *SECONDARY) if k in r}}
        problems += [f"{path}: {method}.{k} is {r[k]} (not a number): written as null" for k in row if row[k] is None]
        runs = {x.get("split"): _number(x.get(head["metric"])) for x in r["runs"] if isinstance(x, dict)}
        rows[method] = {"row": row, "runs": {k: v for k, v in runs.items() if v is not None}}
    return head, rows, problems


def _failure(path) -> str | None:
    """The reason a failure record (ajepa.stages.outcome) at `path` gives, or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return str(data[FAILED]) if isinstance(data, dict) and FAILED in data else None


def collect(params: Params) -> tuple[dict, dict]:
    """(summary {BENCH: {METHOD: {METRIC: value, std}}}, per-benchmark info {metric, protocol, classes, runs,
    problems}), runs being {METHOD: {split: value}}, each protocol run's score, and problems the lines saying
    which results are missing, failed or not numbers (value None)."""
    summary, info = {}, {}
    for bench in params.pipeline.benchmarks:
        summary[bench] = {}
        info[bench] = {"metric": None, "protocol": None, "classes": None, "runs": {}, "problems": []}
        for stage, path in (("linear", paths.linear_results(bench)), ("finetune", paths.finetune_results(bench))):
            head, rows, problems = _stage_rows(path / "metrics.json", stage)
            info[bench]["problems"] += problems
            if head and info[bench]["metric"] is None:
                info[bench].update(head)
            for method, r in rows.items():
                summary[bench][method], info[bench]["runs"][method] = r["row"], r["runs"]
        for method, mark in partial_runs(info[bench]["runs"]).items():
            summary[bench][method]["runs"] = mark
    return summary, info


def partial_runs(runs: dict) -> dict[str, str]:
    """{METHOD: "fold1 of 5"} for the rows averaged over fewer protocol runs than the benchmark has (a
    fine-tuning budget of `runs: 1`), so they are not read as the mean over every fold beside those that are."""
    total = max((len(r) for r in runs.values()), default=0)
    return {m: f"{', '.join(r)} of {total}" for m, r in runs.items() if len(r) < total}


def run(params: Params) -> str:
    summary, info = collect(params)
    out = paths.report_dir()
    pretrain = _read(paths.pretrain_results() / "metrics.json", ("steps", "final_loss"))
    problems = {b: info[b]["problems"] for b in summary if info[b]["problems"]}
    write_json(out / "summary.json", {b: {**rows, **({"problems": problems[b]} if b in problems else {})}
                                      for b, rows in summary.items()})

    metrics_dir = paths.pretrain_live_dir() / "plots" / "metrics"
    plot_pretrain_curves(metrics_dir / "train", out / "plots" / "pretrain.png")
    curves = learning_curves(metrics_dir)
    write_learning_curves(curves, params.pretrain.optim.batch_size, out / "plots" / "learning_curve")
    for bench, rows in summary.items():
        metric = info[bench]["metric"]
        plot_benchmark_bars(bench, {m: r for m, r in rows.items() if r[metric] is not None}, metric,
                            PAPER_RESULTS.get(bench, {}), out / "plots" / f"{bench}.png")
    ablation = paths.ablation_table()
    write_text(out / "report.md", render(summary, info, pretrain, curves, params,
                                         ablation.read_text() if ablation.exists() else None))
    return "\n".join([f"report: {out / 'report.md'}, {out / 'summary.json'}, plots in {out / 'plots'}/",
                      *(f"  {b}: {p}" for b, lines in problems.items() for p in lines)])


def write_learning_curves(curves: dict, batch_size: int, folder) -> None:
    """Each pretraining dataset's learning curve as FOLDER/BENCH.png and its data as FOLDER/BENCH.csv (the
    DVC plot of dvc.yaml, against clips seen)."""
    for bench, table in learning_curve_tables(curves, batch_size).items():
        write_csv(folder / f"{bench}.csv", table)
        plot_learning_curve(bench, table, folder / f"{bench}.png")


def checks(bench: str, rows: dict, info: dict) -> list[str]:
    """The comparisons a benchmark is held to (BARS), as sentences saying met or MISSED. Where one row ran
    fewer protocol runs than the other (fine-tuning a subset of the folds), both are compared on those."""
    out, metric, runs = [], info["metric"], info["runs"]
    for (a, b), bar in BARS.get(bench, DEFAULT_BARS).items():
        if a not in rows or b not in rows or rows[a][metric] is None or rows[b][metric] is None:
            continue
        va, vb, note = rows[a][metric], rows[b][metric], ""
        shared = sorted(set(runs[a]) & set(runs[b]))
        if shared and (len(shared) < len(runs[a]) or len(shared) < len(runs[b])):
            va, vb = (sum(runs[m][s] for s in shared) / len(shared) for m in (a, b))
            note = f" on the runs both have ({', '.join(shared)})"
        d = va - vb
        need = f"at least {bar:+g}" if bar > 0 else "at least level"
        out.append(f"{METHODS[a]} vs {METHODS[b]}{note}: {va:.2f} vs {vb:.2f} ({d:+.2f} points; bar: {need}; "
                   f"{'met' if d >= bar else 'MISSED'})")
    return out


def table_rows(bench: str, rows: dict, info: dict) -> list[str]:
    """The results table's rows of one benchmark: each method, its problems, the paper's numbers."""
    lines = []
    metric = info["metric"]
    for method, label in METHODS.items():
        if method not in rows:
            continue
        r = rows[method]
        std = f" ± {r['std']:.2f}" if r.get("std") is not None else ""
        only = f" ({r['runs']} only)" if "runs" in r else ""
        value = "not a number (null in summary.json)" if r[metric] is None else f"{r[metric]:.2f}{std}{only}"
        lines.append(f"| {bench} | {metric} | {label} | {value} | |")
    lines += [f"| {bench} | {metric or ''} | PROBLEM | {p} | |" for p in info["problems"]]
    for model, value in PAPER_RESULTS.get(bench, {}).items():
        lines.append(f"| {bench} | {metric} | {model}, fine-tuned | | {value:.1f} |")
    return lines


def _curve_label(name: str) -> str:
    """"synth, context encoder" for the learning curve "synth/context"."""
    bench, series = name.split("/", 1)
    return f"{bench}, {CURVE_SERIES.get(series, series)}"


def render(summary: dict, info: dict, pretrain: dict, curves: dict, params: Params,
           ablation: str | None = None) -> str:
    """report.md: the setup, the results table, the checks, the learning curve and, when `ajepa ablate
    --table` wrote one, the ablation table."""
    e, p, o = params.pretrain.encoder, params.pretrain.predictor, params.pretrain.optim
    lines = [
        "# A-JEPA results",
        "",
        f"Pretraining: {' + '.join(f'`{d}`' for d in params.pretrain.datasets)} ({', '.join(params.pretrain.splits)}), "
        f"encoder {e.embed_dim}/{e.depth}/{e.num_heads} (width/depth/heads), predictor "
        f"{p.embed_dim}/{p.depth}/{p.num_heads} ({p.init} init), masking `{params.pretrain.masking.mode}`, "
        f"peak lr {peak_lr(o.lr, o.batch_size, o.lr_scaling):g} at batch {o.batch_size} (`lr: {o.lr:g}` read as "
        f"`lr_scaling: {o.lr_scaling}`; docs/recipes.md), "
        f"{pretrain['steps']} steps, final loss {pretrain['final_loss']:.4f}; "
        f"effective rank of the targets {pretrain.get('target_rank', float('nan')):.1f} of {e.embed_dim} "
        "(near 1: collapsed).",
        "",
        f"Downstream: the `{params.downstream.encoder}` encoder; probes read its tokens pooled over "
        f"`{params.linear.pooling}`.",
        "",
        "| benchmark | metric | method | this run | paper (ViT-B, AS-2M pretraining) |",
        "|---|---|---|---|---|",
    ]
    for bench, rows in summary.items():
        lines += table_rows(bench, rows, info[bench])
    lines += ["", "## Does self-supervision help?", ""]
    for bench, rows in summary.items():
        lines += [f"- {bench}: {c}" for c in checks(bench, rows, info[bench])]
    if curves:
        steps = sorted({int(s) for c in curves.values() for s in c.index})
        lines += ["", "## Learning curve", "",
                  "Validation score of a linear probe (train clips -> val clips; test clips unused) of the model "
                  "being pretrained, by pretraining step (step 0: the untrained encoder; the fbank's score is "
                  "the same probe of the time-averaged spectrogram; `plots/learning_curve/`):", "",
                  "| step | " + " | ".join(_curve_label(n) for n in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for s in steps:
            cells = [f"{c[s]:.1f}" if s in c.index else "" for c in curves.values()]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if ablation:
        lines += ["", "## Ablations", "", f"The paper's ablations as DVC experiments (`ajepa ablate`; "
                  f"`{paths.ablation_table()}`, docs/experiments.md):", "", ablation.rstrip()]
    lines += [
        "",
        "How to read it: `this run` is the mean over the protocol's runs (± the population std over folds for "
        "K-fold benchmarks), or over the runs it names (`fold1 of 5 only`: a fine-tuning budget). Seconds and "
        "throughput are in `logs/timing/`, not here: a rerun that computes the same numbers writes the same "
        "report. The A-JEPA rows use the pretrained encoder; the random-init rows use the same "
        "architecture with untrained weights (what pretraining adds); the fbank row is a linear probe on the "
        "time-averaged log-mel spectrogram (what the input alone gives). Paper rows are published fine-tuning "
        "results of ViT-B models pretrained on AudioSet-2M; they compare with the fine-tuned rows of "
        "a paper-preset run, not with the embedded default. " + SELECTION_NOTE,
        "",
        "Plots: `plots/pretrain.png` (pretraining curves), " +
        ("`plots/learning_curve/BENCH.png` (against steps and clips seen), " if curves else "") +
        ", ".join(f"`plots/{b}.png`" for b in summary) + " (per benchmark).",
        "",
    ]
    return "\n".join(lines)
