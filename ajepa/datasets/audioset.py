"""AudioSet: the segment CSVs and class list, with audio from a directory the user brings.

Google publishes labels, not audio. Copies made from YouTube differ (videos disappear), so numbers
only compare across groups when the clips they had are known: every segment of the CSVs without a
usable file is listed in DATASET.missing.csv, and the sidecar counts listed / found / missing per CSV.

- AS-20K (`as20k`): balanced_train_segments.csv for training, eval_segments.csv for test.
- AS-2M (`as2m`): balanced + unbalanced for training, eval for test. Fine-tuning draws clips with
  AudioMAE's class-frequency weights (`finetune.as2m.balanced_sampling`), computed from the labels of
  the clips actually present, so the manifest carries no weight column.
- AudioSet has no validation split; `val_fraction` of the training segments, chosen by a hash of the
  YTID (so a clip's split does not depend on which other clips a copy has), is held out as `val` for
  model selection (our choice; the protocols need one).

Audio files are matched to segments by YTID under the naming conventions seen in the wild:
`YTID.flac`, `YTID_start_end.wav` (any start/end spelling), and `Y` + YTID (PANNs), in any
sub-folder. Formats libsndfile reads are used; files in other formats (m4a, webm, ...) are reported as
missing with the reason, since features could not read them.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path

import pandas as pd

from ajepa.datasets.manifest import LABEL_SEPARATOR, MISSING_COLUMNS, Built
from ajepa.datasets.sources import Located, listing_fingerprint
from ajepa.datasets.walk import walk_files
from ajepa.errors import AjepaError, ConfigError
from ajepa.progress import progress

CLASS_LABELS = "class_labels_indices.csv"
EVAL = "eval_segments.csv"
TRAINING_CSVS = {"as20k": ("balanced_train_segments.csv",),
                 "as2m": ("balanced_train_segments.csv", "unbalanced_train_segments.csv")}
READABLE = (".flac", ".wav", ".ogg", ".opus", ".mp3")  # preference order when a clip has several files
UNREADABLE = (".m4a", ".aac", ".webm", ".mp4", ".mkv", ".3gp")
YTID = re.compile(r"^[A-Za-z0-9_-]{11}$")
HEADER_COUNTS = re.compile(r"num_segs=(\d+)")


def read_class_labels(path: Path) -> tuple[list[str], list[str]]:
    """(MIDs, display names) in index order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
            raise AjepaError(f"{path}: expected the columns index, mid, display_name")
        rows = list(reader)
    if [r["index"] for r in rows] != [str(i) for i in range(len(rows))]:
        raise AjepaError(f"{path}: the index column must count 0, 1, 2, ...")
    mids, names = [r["mid"] for r in rows], [r["display_name"] for r in rows]
    for i, name in enumerate(names):
        if LABEL_SEPARATOR in name or not name:
            raise AjepaError(f"{path}:{i + 2}: display name {name!r} is empty or contains {LABEL_SEPARATOR!r}, "
                             f"the manifest's label separator")
    for values, what in ((mids, "mid"), (names, "display_name")):
        dup = pd.Series(values)[pd.Series(values).duplicated()]
        if len(dup):
            raise AjepaError(f"{path}: {what} {dup.iloc[0]!r} appears twice")
    return mids, names


def read_segments(path: Path) -> list[tuple[int, str, list[str]]]:
    """[(line number, YTID, MIDs)] of a segment CSV (3-line '#' header, quoted comma-separated MIDs)."""
    out, declared = [], None
    with open(path, newline="") as f:
        for n, fields in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not fields:
                continue
            if fields[0].startswith("#"):
                found = HEADER_COUNTS.search(",".join(fields))
                declared = int(found.group(1)) if found else declared
                continue
            if len(fields) != 4 or not YTID.match(fields[0]):
                raise AjepaError(f"{path}:{n}: expected 'YTID, start_seconds, end_seconds, \"MID,MID,...\"', "
                                 f"got {','.join(fields)!r}")
            out.append((n, fields[0], [m.strip() for m in fields[3].split(",") if m.strip()]))
    if declared is not None and declared != len(out):
        raise AjepaError(f"{path}: the header declares num_segs={declared} but there are {len(out)} segments "
                         f"(truncated or edited?)")
    return out


def ytid_of(stem: str, wanted: set[str]) -> str | None:
    """The YTID a file stem names, under `YTID`, `YTID_<anything>` and `Y` + either of those."""
    candidates = []
    if len(stem) == 11 or (len(stem) > 11 and stem[11] == "_"):
        candidates.append(stem[:11])
    if stem.startswith("Y") and (len(stem) == 12 or (len(stem) > 12 and stem[12] == "_")):
        candidates.append(stem[1:12])
    return next((c for c in candidates if c in wanted), None)


def index_audio(audio_dir: Path, wanted: set[str]) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """(YTID -> readable file, YTID -> file in an unreadable format, duplicate files not used)."""
    found: dict[str, Path] = {}
    unreadable: dict[str, Path] = {}
    duplicates: list[str] = []
    rank = {ext: i for i, ext in enumerate(READABLE)}
    with progress(None, f"index {audio_dir}", "file") as bar:
        for folder, _, files in walk_files(audio_dir):  # each folder once: a link loop neither hangs nor repeats
            bar.update(len(files))
            for name in files:
                stem, ext = os.path.splitext(name)
                ext = ext.lower()
                if ext not in rank and ext not in UNREADABLE:
                    continue
                ytid = ytid_of(stem, wanted)
                if ytid is None:
                    continue
                path = Path(folder) / name
                if ext in UNREADABLE:
                    unreadable.setdefault(ytid, path)
                    continue
                if ytid in found:
                    keep, drop = sorted((found[ytid], path), key=lambda p: rank[p.suffix.lower()])
                    found[ytid] = keep
                    duplicates.append(str(drop))
                else:
                    found[ytid] = path
    return found, unreadable, duplicates


def val_fraction_hash(ytid: str) -> float:
    """A uniform number in [0, 1) fixed by the YTID alone."""
    return int(hashlib.sha1(ytid.encode()).hexdigest()[:12], 16) / 16**12


def audio_dir_of(cfg, name: str) -> Path:
    """The configured audio directory, checked before anything is downloaded."""
    if cfg.audio_dir is None:
        raise ConfigError(f"datasets.{name}.prepare.audio_dir is not set: AudioSet audio is not distributed, "
                          f"point it at your directory of clips named by YTID (docs/datasets.md)")
    if not Path(cfg.audio_dir).is_dir():
        raise ConfigError(f"datasets.{name}.prepare.audio_dir = {cfg.audio_dir!r}: not a directory")
    return Path(cfg.audio_dir)


def build(located: Located, workdir: Path, cfg, name: str) -> Built:
    audio_dir = audio_dir_of(cfg, name)
    mids, names = read_class_labels(located.roots[CLASS_LABELS])
    name_of = dict(zip(mids, names))
    # eval first: a YTID listed for test and training stays in test, so no test clip is trained on
    listings = [(EVAL, "test")] + [(csv_name, "train") for csv_name in TRAINING_CSVS[name]]
    segments = {csv_name: read_segments(located.roots[csv_name]) for csv_name, _ in listings}
    wanted = {ytid for rows in segments.values() for _, ytid, _ in rows}
    found, unreadable, duplicates = index_audio(audio_dir, wanted)

    rows, missing, counts, seen, repeated = [], [], {}, set(), 0
    for csv_name, split in listings:
        listed = present = 0
        for line, ytid, labels in segments[csv_name]:
            if ytid in seen:
                repeated += 1
                continue
            seen.add(ytid)
            listed += 1
            unknown = [m for m in labels if m not in name_of]
            if unknown or not labels:
                raise AjepaError(f"{located.roots[csv_name]}:{line}: label {unknown[0] if unknown else '(none)'!r} "
                                 f"is not in {CLASS_LABELS}")
            clip_split = split
            if split == "train" and val_fraction_hash(ytid) < cfg.val_fraction:
                clip_split = "val"
            if ytid in found:
                present += 1
                rows.append((ytid, str(found[ytid]), LABEL_SEPARATOR.join(name_of[m] for m in labels), 0, clip_split))
            elif ytid in unreadable:
                missing.append((ytid, clip_split, f"{csv_name}:{line}",
                                f"unsupported format {unreadable[ytid].suffix} ({unreadable[ytid]}): convert to "
                                f"flac or wav"))
            else:
                missing.append((ytid, clip_split, f"{csv_name}:{line}", f"no audio file in {audio_dir}"))
        counts[csv_name] = {"split": split, "listed": listed, "found": present, "missing": listed - present}
    frame = pd.DataFrame(rows, columns=["clip_id", "path", "labels", "fold", "split"])
    if frame.empty:
        raise AjepaError(f"datasets.{name}.prepare.audio_dir = {cfg.audio_dir!r}: no audio file matches a YTID of "
                         f"the segment CSVs (expected YTID.flac, YTID_start_end.wav or Y<YTID>.wav)")
    meta = {"mids": mids, "val_fraction": cfg.val_fraction, "segments": counts,
            "repeated_segments": repeated, "audio_dir": str(audio_dir),
            "duplicate_files": {"count": len(duplicates), "first": duplicates[:10]},
            "audio": listing_fingerprint(audio_dir, frame["path"])}
    return Built(frame, names, pd.DataFrame(missing, columns=MISSING_COLUMNS), meta)
