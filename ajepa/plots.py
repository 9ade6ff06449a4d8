"""Pictures a researcher looks at: masks over real spectrograms and the report's plots (fine-tuning
confusion matrices and AP per class are `dvc plots` data, written by the finetune stage)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from ajepa.atomic import atomic_path  # noqa: E402
from ajepa.masks import Masks, masks_to_grid  # noqa: E402


def plot_masks(spectrograms: torch.Tensor, examples: dict[str, Masks], grid: tuple[int, int], patch: int,
               path: Path) -> None:
    """One row per masking mode, one column per clip: the spectrogram with context patches left clear,
    target blocks tinted (one colour each) and unused patches greyed out."""
    n = spectrograms.shape[0]
    fig, axes = plt.subplots(len(examples), n, figsize=(3.2 * n, 2.6 * len(examples)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for r, (mode, masks) in enumerate(examples.items()):
        cells = masks_to_grid(masks, grid).numpy()
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(spectrograms[c].T.numpy(), origin="lower", aspect="auto", cmap="magma",
                      extent=(0, grid[0] * patch, 0, grid[1] * patch))
            overlay = np.zeros((grid[1], grid[0], 4))
            for t in range(grid[0]):
                for f in range(grid[1]):
                    v = cells[c, t, f]
                    overlay[f, t] = (0.5, 0.5, 0.5, 0.75) if v == 0 else (0, 0, 0, 0) if v == 1 else \
                        (*colours((v - 2) % 10)[:3], 0.55)
            ax.imshow(overlay, origin="lower", aspect="auto", interpolation="nearest",
                      extent=(0, grid[0] * patch, 0, grid[1] * patch))
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{mode} masks\nmel bins")
            if r == len(examples) - 1:
                ax.set_xlabel("time frames")
    fig.suptitle("A-JEPA masks: clear = context, tinted = target blocks, grey = unused", fontsize=10)
    _save(fig, path)


def _save(fig, path: Path, dpi: int = 90) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_pretrain_curves(curves_dir: Path, path: Path) -> None:
    _save(pretrain_curves_figure(curves_dir), path)


def pretrain_curves_figure(curves_dir: Path):
    """The DVCLive training curves (loss with its position-only floor, target rank, lr, EMA momentum, TF
    fraction) on one page."""
    names = [n for n in ("loss", "target_rank", "lr", "ema_momentum", "tf_fraction")
             if (curves_dir / f"{n}.tsv").exists()]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.6 * max(len(names), 1), 2.8), squeeze=False)
    floor = curves_dir / "position_only_loss.tsv"
    for ax, name in zip(axes[0], names):
        curve = read_curve(curves_dir / f"{name}.tsv")
        ax.plot(curve.index, curve.values, lw=1.2, label="A-JEPA")
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "), fontsize=9)
        if name == "loss":
            ax.set_yscale("log")
        if name == "loss" and floor.exists():
            # what the targets' positions alone predict: the loss must go below it for context to count
            position_only = read_curve(floor)
            ax.plot(position_only.index, position_only.values, lw=1.2, ls="--", color="tab:gray",
                    label="position only")
            ax.legend(fontsize=7)
    fig.suptitle("A-JEPA pretraining", fontsize=10)
    return fig


def read_curve(path: Path):
    """A DVCLive metric file (TSV: timestamp, step, value named after the metric) as a pandas Series by step."""
    table = pd.read_csv(path, sep="\t")
    return table.set_index("step")[path.stem]


def learning_curves(curves_dir: Path) -> dict[str, object]:
    """{"BENCH/ENCODER": Series by step} from the `probe/...` metrics of the pretraining curves."""
    root = curves_dir / "probe"
    return {f"{p.parent.name}/{p.stem}": read_curve(p) for p in sorted(root.glob("*/*.tsv"))} if root.is_dir() else {}


# the columns of a learning curve's table: the probed encoders and the baseline (blank where not probed,
# so that every dataset's table has the fields dvc.yaml's plot names)
CURVE_SERIES = {"context": "context encoder", "target": "target encoder", "fbank": "time-averaged fbank"}


def learning_curve_tables(curves: dict, batch_size: int) -> dict:
    """{BENCH: table} of learning_curves' series: step, clips_seen (steps x batch size), then one score
    column per CURVE_SERIES."""
    import pandas as pd
    tables = {}
    for bench in dict.fromkeys(name.split("/")[0] for name in curves):
        table = pd.DataFrame({c: curves[f"{bench}/{c}"] for c in CURVE_SERIES if f"{bench}/{c}" in curves})
        table = table.reindex(columns=list(CURVE_SERIES)).rename_axis("step").reset_index()
        table.insert(1, "clips_seen", table["step"] * batch_size)
        tables[bench] = table
    return tables


def plot_learning_curve(bench: str, table, path: Path) -> None:
    """One dataset's learning curve (learning_curve_tables): validation score of each probed encoder against
    pretraining steps and against clips seen, the fbank's as a level line."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2), sharey=True)
    for ax, x, label in zip(axes, ("step", "clips_seen"), ("pretraining step", "clips seen (steps x batch size)")):
        for column in ("context", "target"):
            if table[column].notna().any():
                ax.plot(table[x], table[column], marker="o", lw=1.2, label=CURVE_SERIES[column])
        if table["fbank"].notna().any():
            ax.axhline(table["fbank"].dropna().iloc[-1], ls="--", lw=1.2, color="tab:gray", label=CURVE_SERIES["fbank"])
        ax.set_xlabel(label)
        # at most 5 ticks, thousands separated: 80,000 clips and its neighbours otherwise run together
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes[0].set_ylabel("validation score (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{bench}: linear probe of the model being pretrained (step 0: random init)", fontsize=9)
    _save(fig, path)


def plot_benchmark_bars(bench: str, rows: dict, metric: str, paper: dict[str, float], path: Path) -> None:
    _save(benchmark_bars_figure(bench, rows, metric, paper), path)


def benchmark_bars_figure(bench: str, rows: dict, metric: str, paper: dict[str, float]):
    """This run's methods (with fold std as error bars; a row over fewer runs than the protocol's names
    them) and the paper's fine-tuned numbers, where it has some."""
    labels, values, errs, colours = [], [], [], []
    for method, r in rows.items():
        labels.append(method.replace("_", " ") + (f"\n({r['runs']})" if "runs" in r else ""))
        values.append(r[metric])
        errs.append(r.get("std", 0.0))
        colours.append("tab:blue" if method in ("linear", "finetune") else "tab:gray")
    for model, v in paper.items():
        labels.append(f"{model} (paper)" if "paper" not in model else model)
        values.append(v)
        errs.append(0.0)
        colours.append("tab:orange")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 1.5), 3.4))
    ax.bar(range(len(values)), values, yerr=errs, color=colours, capsize=3)
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{bench}: this run (blue: A-JEPA, grey: baselines)" + (", paper (orange)" if paper else ""),
                 fontsize=9)
    return fig
