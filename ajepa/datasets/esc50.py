"""ESC-50: 2,000 five-second clips at 44.1 kHz, 50 classes, five folds from `meta/esc50.csv`.

Protocol: 5-fold cross-validation over the `fold` column (ajepa.downstream.protocols, "folds").
"""

from __future__ import annotations

from pathlib import Path

from ajepa.datasets.manifest import Built, esc50_layout, split_present
from ajepa.datasets.sources import Located
from ajepa.errors import AjepaError

META_CSV = "meta/esc50.csv"
COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def build(located: Located, workdir: Path, cfg=None) -> Built:
    root = located.roots["main"]
    rows, classes = esc50_layout(root, meta_csv=META_CSV)
    folds = sorted(int(f) for f in rows["fold"].unique())
    if folds != list(range(1, len(folds) + 1)):
        raise AjepaError(f"{root / META_CSV}: folds must be numbered 1..K, found {folds}")
    present, missing = split_present(rows, META_CSV)
    return Built(present, classes, missing, {"num_folds": len(folds)})
