"""VoxCeleb1 speaker identification: `wav/idXXXXX/<video>/<nnnnn>.wav` and `iden_split.txt`.

The dev set comes as four pieces of one zip (concatenated on the fly, see ajepa.datasets.archive), the
test set as a second zip; both extract into the same `wav/` tree. Each line of iden_split.txt is
`<1|2|3> idXXXXX/<video>/<nnnnn>.wav`: 1 = train, 2 = val, 3 = test. The classes are every speaker
the split file names (1,251), so a copy with missing clips keeps the same class indices.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ajepa.datasets.manifest import MISSING_COLUMNS, Built
from ajepa.datasets.sources import Located
from ajepa.errors import AjepaError

SPLIT_FILE = "iden_split.txt"
SPLITS = {"1": "train", "2": "val", "3": "test"}


def read_iden_split(path: Path) -> list[tuple[str, str]]:
    """[(split, 'idXXXXX/video/nnnnn.wav')] in file order."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] not in SPLITS or not fields[1].endswith(".wav") or fields[1].count("/") != 2:
            raise AjepaError(f"{path}:{n}: expected '<1|2|3> idXXXXX/<video>/<nnnnn>.wav', got {line.strip()!r}")
        out.append((SPLITS[fields[0]], fields[1]))
    if not out:
        raise AjepaError(f"{path}: empty split file")
    return out


def build(located: Located, workdir: Path, cfg=None) -> Built:
    entries = read_iden_split(located.roots[SPLIT_FILE])
    # dev and test extract into one tree when downloaded, but may be two trees in a user's directory
    wav_roots = list(dict.fromkeys(located.roots[p] / "wav" for p in ("dev", "test")))
    rows, missing = [], []
    for split, rel in entries:
        path = next((r / rel for r in wav_roots if (r / rel).is_file()), None)
        if path is None:
            missing.append((rel[:-4], split, SPLIT_FILE, "file not found"))
        else:
            rows.append((rel[:-4], str(path), rel.split("/")[0], 0, split))
    frame = pd.DataFrame(rows, columns=["clip_id", "path", "labels", "fold", "split"])
    speakers = sorted({rel.split("/")[0] for _, rel in entries})
    return Built(frame, speakers, pd.DataFrame(missing, columns=MISSING_COLUMNS),
                 {"speakers": len(speakers), "listed": len(entries)})
