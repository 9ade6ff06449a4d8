"""One description per dataset: protocol, labels and the published normalisation statistics.

The download sources, sizes and checksums of the real benchmarks join this table with the
datasets issue; the embedded `synth` set is generated, not fetched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    protocol: str  # "folds" (K-fold CV), "splits" (fixed train/val/test) or "multilabel"
    published_stats: tuple[float, float] | None = None  # AudioMAE/AST mean, std, for comparison


REGISTRY = {
    "synth": DatasetInfo("synth", "embedded synthetic time-frequency events (12 classes, 5 folds)", "folds"),
}
