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


# Fine-tuned ViT-B, AudioSet-only pretraining (DESIGN.md, "Numbers to report against"), keyed by
# benchmark name; mAP for the AudioSet benchmarks, accuracy for the rest, both in percent.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "as2m": {"A-JEPA (paper)": 48.6, "AudioMAE": 47.3, "BEATs iter3": 48.0, "EAT": 48.6},
    "as20k": {"A-JEPA (paper)": 38.4, "AudioMAE": 37.0, "BEATs iter3": 38.3, "EAT": 40.3},
    "esc50": {"A-JEPA (paper)": 96.3, "AudioMAE": 94.1, "BEATs iter3": 95.6, "EAT": 96.0},
    "spc2": {"A-JEPA (paper)": 98.5, "AudioMAE": 98.3, "BEATs iter3": 98.3, "EAT": 98.3},
    "spc1": {"A-JEPA (paper)": 97.7, "AudioMAE": 96.9, "BEATs iter3": 97.7},
    "sid": {"A-JEPA (paper)": 95.8, "AudioMAE": 94.8},
}
