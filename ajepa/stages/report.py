"""`ajepa report`: one table of this run's results (every benchmark x {linear, fine-tune} with the
random-init and fbank baselines) next to the paper's numbers, the same numbers as JSON, and plots."""

from __future__ import annotations

import json

from ajepa import paths
from ajepa.atomic import write_json, write_text
from ajepa.config import Params
from ajepa.data.registry import PAPER_RESULTS
from ajepa.downstream.metrics import SECONDARY
from ajepa.errors import AjepaError

METHODS = {  # summary.json key -> how the report names the row
    "linear": "A-JEPA, linear probe",
    "linear_random_init": "random-init encoder, linear probe",
    "fbank_baseline": "time-averaged fbank, linear probe",
    "finetune": "A-JEPA, fine-tuned",
    "finetune_random_init": "random-init encoder, fine-tuned",
}


def _read(path) -> dict:
    if not path.exists():
        raise AjepaError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def collect(params: Params) -> tuple[dict, dict]:
    """(summary {BENCH: {METHOD: {METRIC: value, std}}}, per-benchmark info {metric, protocol, classes})."""
    summary, info = {}, {}
    for bench in params.pipeline.benchmarks:
        stage_metrics = [_read(paths.linear_results(bench) / "metrics.json"),
                         _read(paths.finetune_results(bench) / "metrics.json")]
        metric = stage_metrics[0]["metric"]
        info[bench] = {k: stage_metrics[0][k] for k in ("metric", "protocol", "classes")}
        summary[bench] = {}
        for m in stage_metrics:
            for method in METHODS:
                if method in m:
                    summary[bench][method] = {metric: m[method][metric],
                                              **{k: m[method][k] for k in ("std", *SECONDARY) if k in m[method]}}
    return summary, info


def run(params: Params) -> str:
    summary, info = collect(params)
    out = paths.report_dir()
    pretrain = _read(paths.pretrain_results() / "metrics.json")
    write_json(out / "summary.json", summary)

    from ajepa.plots import plot_benchmark_bars, plot_pretrain_curves
    curves = paths.pretrain_results() / "live" / "plots" / "metrics" / "train"
    plot_pretrain_curves(curves, out / "plots" / "pretrain.png")
    for bench in summary:
        plot_benchmark_bars(bench, summary[bench], info[bench]["metric"], PAPER_RESULTS.get(bench, {}),
                            out / "plots" / f"{bench}.png")
    write_text(out / "report.md", render(summary, info, pretrain, params))
    return f"report: {out / 'report.md'}, {out / 'summary.json'}, plots in {out / 'plots'}/"


def checks(rows: dict, metric: str) -> list[str]:
    """The comparisons the embedded default is held to (README, "Quality bar"), as sentences."""
    out = []

    def diff(a: str, b: str, bar: float, what: str) -> None:
        if a not in rows or b not in rows:
            return
        d = rows[a][metric] - rows[b][metric]
        met = d >= bar if bar > 0 else d > 0
        need = f"at least {bar:+g}" if bar > 0 else "above"
        out.append(f"{what}: {rows[a][metric]:.2f} vs {rows[b][metric]:.2f} ({d:+.2f} points; bar: {need}; "
                   f"{'met' if met else 'MISSED'})")

    diff("linear", "linear_random_init", 15.0, "linear probe, A-JEPA vs random init")
    diff("linear", "fbank_baseline", 0.0, "linear probe, A-JEPA vs time-averaged fbank")
    diff("finetune", "finetune_random_init", 0.0, "fine-tuned, A-JEPA vs random init")
    return out


def render(summary: dict, info: dict, pretrain: dict, params: Params) -> str:
    e, p = params.pretrain.encoder, params.pretrain.predictor
    lines = [
        "# A-JEPA results",
        "",
        f"Pretraining: `{params.pretrain.dataset}` ({', '.join(params.pretrain.splits)}), encoder "
        f"{e.embed_dim}/{e.depth}/{e.num_heads} (width/depth/heads), predictor {p.embed_dim}/{p.depth}/{p.num_heads} "
        f"({p.init} init), "
        f"masking `{params.pretrain.masking.mode}`, {pretrain['steps']} steps, final loss {pretrain['final_loss']:.4f}, "
        f"{pretrain['samples_per_s']:g} samples/s on {pretrain['device']} (x{pretrain['world_size']}); "
        f"effective rank of the targets {pretrain.get('target_rank', float('nan')):.1f} of {e.embed_dim} "
        "(near 1: collapsed).",
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
            lines.append(f"| {bench} | {metric} | {label} | {r[metric]:.2f}{std} | |")
        for model, value in PAPER_RESULTS.get(bench, {}).items():
            lines.append(f"| {bench} | {metric} | {model}, fine-tuned | | {value:.1f} |")
    lines += ["", "## Does self-supervision help?", ""]
    for bench, rows in summary.items():
        lines += [f"- {bench}: {c}" for c in checks(rows, info[bench]["metric"])]
    lines += [
        "",
        "How to read it: `this run` is the mean over the protocol's runs (± the population std over folds for "
        "K-fold benchmarks). The A-JEPA rows use the pretrained encoder; the random-init rows use the same "
        "architecture with untrained weights (what pretraining adds); the fbank row is a linear probe on the "
        "time-averaged log-mel spectrogram (what the input alone gives). Paper rows are published fine-tuning "
        "results of ViT-B models pretrained on AudioSet-2M (DESIGN.md); they compare with the fine-tuned rows of "
        "a paper-preset run, not with the embedded default.",
        "",
        "Plots: `plots/pretrain.png` (pretraining curves), " +
        ", ".join(f"`plots/{b}.png`" for b in summary) + " (per benchmark).",
        "",
    ]
    return "\n".join(lines)
