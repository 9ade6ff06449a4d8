"""Manifests: one CSV per dataset with the same columns everywhere, plus a JSON sidecar.

Columns
    clip_id      unique within the dataset
    path         audio file, relative to the working directory (the repository root)
    labels       class names joined by LABEL_SEPARATOR ';' (several for multi-label sets such as
                 AudioSet; empty for unlabeled clips)
    fold         1..K for fold-protocol datasets (ESC-50 style cross-validation), 0 otherwise
    split        train | val | test | pretrain (unlabeled pretraining pool)
    duration_s   from the file header
    sample_rate  from the file header
The sidecar (`DATASET.json`) holds what a table cannot: the ordered class list, the protocol, the
source and its checksum, and counts, so two copies of a dataset can be compared.

`DATASET.missing.csv` lists every clip that the dataset's own listing names (a metadata CSV, a split
list, AudioSet's segment CSVs) but that is not in the copy at hand, with where it was listed and why
it is missing; the sidecar counts them. It is written for every dataset, empty when nothing is
missing, so a copy with holes is never mistaken for a complete one.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from ajepa.atomic import write_csv, write_json
from ajepa.choices import Split, names
from ajepa.errors import AjepaError
from ajepa.paths import escapes
from ajepa.progress import progress

COLUMNS = ["clip_id", "path", "labels", "fold", "split", "duration_s", "sample_rate"]
MISSING_COLUMNS = ["clip_id", "split", "listed_in", "reason"]
LABEL_SEPARATOR = ";"
SPLITS = names(Split)
# splits whose clips feed the normalisation statistics: the labeled training data and the unlabeled pool
STATS_SPLITS = ("train", "pretrain")


@dataclass
class Built:
    """What a dataset recipe finds: manifest rows (without the header columns `add_audio_info` adds),
    the ordered classes, the listed-but-missing clips and dataset-specific sidecar entries."""

    rows: pd.DataFrame
    classes: list[str]
    missing: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MISSING_COLUMNS))
    meta: dict = field(default_factory=dict)


def manifest_paths(root: Path, name: str) -> tuple[Path, Path]:
    return root / f"{name}.csv", root / f"{name}.json"


def missing_path(root: Path, name: str) -> Path:
    return root / f"{name}.missing.csv"


def split_present(rows: pd.DataFrame, listed_in) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows whose file exists, missing-table rows for the others). `listed_in` names the listing
    the rows come from: one name for all rows, or a sequence aligned with `rows`."""
    exists = np.array([Path(p).is_file() for p in rows["path"]], dtype=bool)
    gone = rows[~exists]
    listed = listed_in if isinstance(listed_in, str) else np.asarray(listed_in, dtype=object)[~exists]
    missing = pd.DataFrame({"clip_id": gone["clip_id"].to_numpy(), "split": gone["split"].to_numpy(),
                            "listed_in": listed, "reason": "file not found"}, columns=MISSING_COLUMNS)
    return rows[exists].reset_index(drop=True), missing


def audio_info(path: Path) -> tuple[float, int]:
    """(duration in seconds, sample rate) from the header; (0, 0) when unreadable: features reports it."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):
        return 0.0, 0
    return info.frames / info.samplerate if info.samplerate else 0.0, info.samplerate


def esc50_layout(root: Path, meta_csv: str = "meta/esc50.csv", audio_dir: str = "audio") -> tuple[pd.DataFrame, list[str]]:
    """Rows for a dataset in the ESC-50 layout (meta CSV with filename, fold, target, category).

    Returns the manifest rows and the class names ordered by `target`. Every labeled clip is a
    training clip of its fold: the protocol is K-fold cross-validation over `fold`.
    """
    meta_path = root / meta_csv
    try:
        meta = pd.read_csv(meta_path)
    except FileNotFoundError:
        raise AjepaError(f"{meta_path}: metadata file not found (expected the ESC-50 layout)") from None
    missing = {"filename", "fold", "target", "category"} - set(meta.columns)
    if missing:
        raise AjepaError(f"{meta_path}: missing columns {sorted(missing)}")
    classes = meta.drop_duplicates("target").sort_values("target")["category"].tolist()
    if meta["fold"].isna().any() or meta["target"].isna().any():
        raise AjepaError(f"{meta_path}: empty fold or target values")
    rows = pd.DataFrame({
        "clip_id": meta["filename"].str.replace(r"\.wav$", "", regex=True),
        "path": listed_paths(root / audio_dir, meta["filename"], meta_path),
        "labels": meta["category"],
        "fold": meta["fold"].astype(int),
        "split": "train",
    })
    return rows, classes


def unlabeled_rows(root: Path, meta_csv: str, audio_dir: str) -> pd.DataFrame:
    """Rows for an unlabeled pretraining pool listed by filename in `meta_csv`."""
    meta_path = root / meta_csv
    try:
        names = pd.read_csv(meta_path)["filename"]
    except (FileNotFoundError, KeyError):
        raise AjepaError(f"{meta_path}: expected a CSV with a 'filename' column") from None
    return pd.DataFrame({"clip_id": names.str.replace(r"\.wav$", "", regex=True),
                         "path": listed_paths(root / audio_dir, names, meta_path),
                         "labels": "", "fold": 0, "split": "pretrain"})


def listed_paths(folder: Path, names: pd.Series, listing: Path) -> list[str]:
    """folder/NAME for each name a dataset's listing gives; a name that would lead outside the
    folder (absolute, or climbing out with '..') is refused, so a listing reads only its dataset."""
    for i, name in enumerate(names.astype(str)):
        if reason := escapes(name):
            raise AjepaError(f"{listing} line {i + 2}: filename {name!r} has {reason}, leading outside "
                             f"{folder}: refusing it")
    return [str(folder / f) for f in names]


HEADER_THREADS = 16  # header reads wait on the file system (a network one at scale), not on the CPU


def add_audio_info(rows: pd.DataFrame, desc: str = "read headers") -> pd.DataFrame:
    """The rows with each file's duration and sample rate: one header read per clip, HEADER_THREADS at
    a time (libsndfile releases the GIL), so 2 M clips on a shared file system take minutes, not hours."""
    paths = [Path(p) for p in rows["path"]]
    threads = max(1, min(HEADER_THREADS, len(paths)))  # never a thread without a file
    with progress(len(rows), desc, "clip") as bar:
        try:
            with ThreadPoolExecutor(threads) as pool:
                info = []
                for item in pool.map(audio_info, paths, chunksize=1):
                    info.append(item)
                    bar.update()
        except RuntimeError as e:  # "can't start new thread": a cap on processes or threads
            raise AjepaError(f"{desc}: cannot start {threads} threads ({e}): raise the job's process limit") from None
    rows = rows.copy()
    rows["duration_s"] = [round(d, 6) for d, _ in info]
    rows["sample_rate"] = [sr for _, sr in info]
    return rows[COLUMNS]


def write_manifest(root: Path, name: str, rows: pd.DataFrame, meta: dict,
                   missing: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """Write DATASET.csv, DATASET.json and DATASET.missing.csv (header only when nothing is missing)."""
    rows = rows[COLUMNS]
    missing = pd.DataFrame(columns=MISSING_COLUMNS) if missing is None else missing[MISSING_COLUMNS]
    if rows["clip_id"].duplicated().any():
        dup = rows.loc[rows["clip_id"].duplicated(), "clip_id"].iloc[0]
        raise AjepaError(f"manifest {name}: duplicate clip_id {dup!r}")
    bad = set(rows["split"]) - set(SPLITS)
    if bad:
        raise AjepaError(f"manifest {name}: unknown split(s) {sorted(bad)} (known: {', '.join(SPLITS)})")
    counts = {s: int((rows["split"] == s).sum()) for s in SPLITS}
    meta = {"name": name, "clips": len(rows), "splits": counts,
            "hours": round(float(rows["duration_s"].sum()) / 3600, 4), "missing": len(missing), **meta}
    csv_path, json_path = manifest_paths(root, name)
    write_csv(missing_path(root, name), missing)
    write_csv(csv_path, rows)
    write_json(json_path, meta)
    return csv_path, json_path


def read_manifest(root: Path, name: str) -> tuple[pd.DataFrame, dict]:
    csv_path, json_path = manifest_paths(root, name)
    if not csv_path.exists():
        raise AjepaError(f"{csv_path}: manifest not found (run `ajepa prepare {name}` first)")
    rows = pd.read_csv(csv_path, keep_default_na=False, dtype={"clip_id": str, "labels": str, "path": str})
    missing = set(COLUMNS) - set(rows.columns)
    if missing:
        raise AjepaError(f"{csv_path}: missing columns {sorted(missing)}")
    meta = json.loads(json_path.read_text()) if json_path.exists() else {}
    return rows, meta
