"""What the linear and fine-tuning stages share: loading the encoder, summarising runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ajepa.downstream.metrics import SECONDARY
from ajepa.export import read_export
from ajepa.models import SpectrogramEncoder
from ajepa.models.state import load_fitting
from ajepa.train.checkpoint import file_sha256

__all__ = ["build_encoder", "file_sha256", "summarize", "summary_lines", "ENCODER_KEYS"]

ENCODER_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def build_encoder(path: Path, grid: tuple[int, int], random_init: bool = False, seed: int = 0,
                  drop_path: float | None = None) -> SpectrogramEncoder:
    """The pretrained encoder of the export folder `path` on this benchmark's grid, or (random_init) the
    same architecture with fresh weights drawn from `seed`: the baseline that tells what pretraining adds.

    The position embedding is a fixed function of the grid (not stored), so an encoder pretrained on
    one clip length loads on another."""
    _, state, config = read_export(path)
    arch = config["architecture"]  # checked against the weights
    kwargs = {k: arch[k] for k in ENCODER_KEYS if k in arch}
    kwargs["drop_path"] = arch.get("drop_path", 0.0) if drop_path is None else drop_path
    torch.manual_seed(seed)
    encoder = SpectrogramEncoder(tuple(grid), **kwargs)
    if not random_init:
        load_fitting(encoder, state, str(path))
    return encoder


def summarize(runs: list[dict], metric: str) -> dict:
    """{metric: mean, "std": population std over the runs (folds), "runs": [...]}, rounded for reading.
    The secondary multi-label metrics (mAUC, d') are averaged too where the runs carry them."""
    scores = np.array([r[metric] for r in runs], dtype=float)
    out = {metric: round(float(scores.mean()), 2)}
    if len(scores) > 1:
        out["std"] = round(float(scores.std()), 2)
    for key in SECONDARY:
        if runs and all(key in r for r in runs):
            values = [r[key] for r in runs]
            out[key] = None if None in values else round(float(np.mean(values)), 4)
    out["runs"] = runs
    return out


def summary_lines(rows: dict, metric: str) -> list[str]:
    """One line per row for a stage's terminal summary: name, metric, mean +- std over the runs (and the
    seconds the row took, where it says)."""
    width = max(len(name) for name in rows) + 2
    return [f"  {name:{width}s} {metric} {r[metric]:6.2f}" + (f" +- {r['std']:.2f}" if "std" in r else "")
            + (f"  ({r['seconds']:.0f} s)" if "seconds" in r else "") for name, r in rows.items()]
