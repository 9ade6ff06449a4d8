"""Evaluation protocols: which labeled clips train, select (validation) and score (test).

`folds`       K-fold cross-validation (ESC-50). Run k tests on fold k, validates on the next fold
              (k mod K + 1) and trains on the other K - 2; the benchmark's figure is the mean
              (and population std) over the K runs. The paper (AudioMAE's recipe) has no
              validation split for ESC-50; one fold is held out so that the epoch (fine-tuning)
              and the stopping point (linear probe) are chosen without looking at the test fold.
`splits`      fixed train / val / test splits (Speech Commands, VoxCeleb1 SID).
`multilabel`  fixed splits with multi-hot targets (AudioSet): BCE and mAP instead of CE and accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ajepa.data.loader import SpectrogramDataset
from ajepa.data.store import FeatureStore
from ajepa.downstream import metrics
from ajepa.errors import AjepaError

__all__ = ["EvalSplit", "Task", "eval_splits", "load_task", "LABELED_SPLITS"]

LABELED_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EvalSplit:
    name: str  # "fold1" ... or "test"
    train: np.ndarray  # positions in the labeled store
    val: np.ndarray
    test: np.ndarray


@dataclass
class Task:
    """A benchmark's labeled clips: targets y [N] (class index) or [N, C] (multi-hot), the protocol's
    splits, and the spectrograms through `clips(positions)`, from memory when the set is small
    enough to hold (x [N, T, F]) and from the memory-mapped store otherwise."""

    name: str
    protocol: str
    classes: list[str]
    x: torch.Tensor
    y: torch.Tensor
    index: pd.DataFrame
    splits: list[EvalSplit]
    store: FeatureStore

    def clips(self, positions) -> torch.Tensor:
        """Normalised spectrograms [len(positions), T, F] (float32)."""
        if self.x.numel():
            return self.x[torch.as_tensor(positions, dtype=torch.long)]
        return torch.stack([self.store[int(i)] for i in positions])

    @property
    def multi_label(self) -> bool:
        return self.protocol == "multilabel"

    @property
    def metric(self) -> str:
        return "mAP" if self.multi_label else "accuracy"

    def score(self, y: torch.Tensor, logits: torch.Tensor) -> dict:
        """The benchmark's metrics of raw model outputs (softmax, or per-class sigmoid, scores)."""
        if self.multi_label:
            return metrics.multilabel_metrics(y.numpy(), torch.sigmoid(logits).numpy())
        return metrics.singlelabel_metrics(y.numpy(), torch.softmax(logits, dim=1).numpy(), len(self.classes))

    def selection_score(self, y: torch.Tensor, logits: torch.Tensor) -> float:
        """What model selection looks at, cheaply: argmax accuracy in percent, or mAP (per-class sklearn AP)."""
        if self.multi_label:
            return metrics.mean_average_precision(y.numpy(), torch.sigmoid(logits).numpy())
        return float((logits.argmax(1) == y).float().mean()) * 100.0


def eval_splits(index: pd.DataFrame, protocol: str) -> list[EvalSplit]:
    """The train/val/test position arrays of every run the protocol asks for (see module docstring)."""
    if protocol == "folds":
        folds = sorted(int(f) for f in index["fold"].unique())
        if len(folds) < 3:
            raise AjepaError(f"protocol 'folds' needs at least 3 folds (train, val, test); the manifest has {folds}")
        fold = index["fold"].to_numpy()
        out = []
        for i, k in enumerate(folds):
            v = folds[(i + 1) % len(folds)]
            out.append(EvalSplit(f"fold{k}", np.flatnonzero((fold != k) & (fold != v)), np.flatnonzero(fold == v),
                                 np.flatnonzero(fold == k)))
        return out
    if protocol in ("splits", "multilabel"):
        split = index["split"].to_numpy()
        parts = {s: np.flatnonzero(split == s) for s in LABELED_SPLITS}
        empty = [s for s, p in parts.items() if len(p) == 0]
        if empty:
            raise AjepaError(f"protocol {protocol!r} needs train, val and test clips; the manifest has none in "
                             f"{', '.join(empty)}")
        return [EvalSplit("test", parts["train"], parts["val"], parts["test"])]
    raise AjepaError(f"unknown evaluation protocol {protocol!r} (known: folds, splits, multilabel)")


IN_MEMORY_BYTES = 2 << 30  # labeled sets up to 2 GiB of float32 spectrograms are held in memory


def load_task(name: str, features_root) -> Task:
    """The labeled clips of a feature store with their targets and protocol splits."""
    store = FeatureStore(features_root, splits=LABELED_SPLITS)
    if len(store) == 0:
        raise AjepaError(f"{store.root}: no labeled clips (splits {', '.join(LABELED_SPLITS)})")
    protocol = store.stats.get("protocol")
    classes = store.stats.get("classes")
    if not classes:
        raise AjepaError(f"{store.root}/stats.json: no class list (rerun `ajepa features` for {name})")
    ds = SpectrogramDataset(store, classes, multi_label=protocol == "multilabel")
    t, f = store.shape
    small = len(store) * t * f * 4 <= IN_MEMORY_BYTES
    x = torch.stack([store[i] for i in range(len(store))]) if small else torch.empty(0)
    return Task(name, protocol, list(classes), x, ds.targets, store.index, eval_splits(store.index, protocol), store)
