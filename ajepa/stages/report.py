"""`ajepa report`: one table of this run's results (every benchmark x {probes, fine-tuning} with the
random-init and fbank baselines) next to the paper's numbers, the same numbers as JSON, the learning
curve, and plots."""

from __future__ import annotations

import json

from ajepa import paths
from ajepa.atomic import write_json, write_text
from ajepa.config import Params
from ajepa.datasets.registry import PAPER_RESULTS
from ajepa.downstream.metrics import SECONDARY
from ajepa.errors import AjepaError

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


def _read(path) -> dict:
    if not path.exists():
        raise AjepaError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def collect(params: Params) -> tuple[dict, dict]:
    """(summary {BENCH: {METHOD: {METRIC: value, std}}}, per-benchmark info {metric, protocol, classes, runs}),
    runs being {METHOD: {split: value}}, each protocol run's score."""
    summary, info = {}, {}
    for bench in params.pipeline.benchmarks:
        stage_metrics = [_read(paths.linear_results(bench) / "metrics.json"),
                         _read(paths.finetune_results(bench) / "metrics.json")]
        metric = stage_metrics[0]["metric"]
        info[bench] = {k: stage_metrics[0][k] for k in ("metric", "protocol", "classes")}
        summary[bench], info[bench]["runs"] = {}, {}
        for m in stage_metrics:
            for method in METHODS:
                if method in m:
                    summary[bench][method] = {metric: m[method][metric],
                                              **{k: m[method][k] for k in ("std", *SECONDARY) if k in m[method]}}
                    info[bench]["runs"][method] = {r["split"]: r[metric] for r in m[method]["runs"]}
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
    pretrain = _read(paths.pretrain_results() / "metrics.json")
    write_json(out / "summary.json", summary)

    from ajepa.plots import learning_curves, plot_benchmark_bars, plot_learning_curve, plot_pretrain_curves
    metrics_dir = paths.pretrain_live_dir() / "plots" / "metrics"
    plot_pretrain_curves(metrics_dir / "train", out / "plots" / "pretrain.png")
    curves = learning_curves(metrics_dir)
    if curves:
        plot_learning_curve(curves, out / "plots" / "learning_curve.png")
    for bench in summary:
        plot_benchmark_bars(bench, summary[bench], info[bench]["metric"], PAPER_RESULTS.get(bench, {}),
                            out / "plots" / f"{bench}.png")
    write_text(out / "report.md", render(summary, info, pretrain, curves, params))
    return f"report: {out / 'report.md'}, {out / 'summary.json'}, plots in {out / 'plots'}/"


def checks(bench: str, rows: dict, info: dict) -> list[str]:
    """The comparisons a benchmark is held to (BARS), as sentences saying met or MISSED. Where one row ran
    fewer protocol runs than the other (fine-tuning a subset of the folds), both are compared on those."""
    out, metric, runs = [], info["metric"], info["runs"]
    for (a, b), bar in BARS.get(bench, DEFAULT_BARS).items():
        if a not in rows or b not in rows:
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


def render(summary: dict, info: dict, pretrain: dict, curves: dict, params: Params) -> str:
    e, p = params.pretrain.encoder, params.pretrain.predictor
    lines = [
        "# A-JEPA results",
        "",
        f"Pretraining: {' + '.join(f'`{d}`' for d in params.pretrain.datasets)} ({', '.join(params.pretrain.splits)}), "
        f"encoder {e.embed_dim}/{e.depth}/{e.num_heads} (width/depth/heads), predictor "
        f"{p.embed_dim}/{p.depth}/{p.num_heads} ({p.init} init), masking `{params.pretrain.masking.mode}`, "
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
        metric = info[bench]["metric"]
        for method, label in METHODS.items():
            if method not in rows:
                continue
            r = rows[method]
            std = f" ± {r['std']:.2f}" if "std" in r else ""
            only = f" ({r['runs']} only)" if "runs" in r else ""
            lines.append(f"| {bench} | {metric} | {label} | {r[metric]:.2f}{std}{only} | |")
        for model, value in PAPER_RESULTS.get(bench, {}).items():
            lines.append(f"| {bench} | {metric} | {model}, fine-tuned | | {value:.1f} |")
    lines += ["", "## Does self-supervision help?", ""]
    for bench, rows in summary.items():
        lines += [f"- {bench}: {c}" for c in checks(bench, rows, info[bench])]
    if curves:
        steps = sorted({int(s) for c in curves.values() for s in c.index})
        lines += ["", "## Learning curve", "",
                  "Validation score of a linear probe (train clips -> val clips; test clips unused) of the model "
                  "being pretrained, by pretraining step (`plots/learning_curve.png`):", "",
                  "| step | " + " | ".join(n.replace("/", ", ") + " encoder" for n in curves) + " |",
                  "|---|" + "---|" * len(curves)]
        for s in steps:
            cells = [f"{c[s]:.1f}" if s in c.index else "" for c in curves.values()]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read it: `this run` is the mean over the protocol's runs (± the population std over folds for "
        "K-fold benchmarks), or over the runs it names (`fold1 of 5 only`: a fine-tuning budget). Seconds and "
        "throughput are in `logs/timing/`, not here: a rerun that computes the same numbers writes the same "
        "report. The A-JEPA rows use the pretrained encoder; the random-init rows use the same "
        "architecture with untrained weights (what pretraining adds); the fbank row is a linear probe on the "
        "time-averaged log-mel spectrogram (what the input alone gives). Paper rows are published fine-tuning "
        "results of ViT-B models pretrained on AudioSet-2M; they compare with the fine-tuned rows of "
        "a paper-preset run, not with the embedded default.",
        "",
        "Plots: `plots/pretrain.png` (pretraining curves), " + ("`plots/learning_curve.png`, " if curves else "") +
        ", ".join(f"`plots/{b}.png`" for b in summary) + " (per benchmark).",
        "",
    ]
    return "\n".join(lines)
