"""Speech Commands v1 and v2: `<word>/<speaker>_nohash_<n>.wav` with two split lists.

SPC-2 (AudioMAE/AST): 35-way word classification; `validation_list.txt` is val, `testing_list.txt`
is test, every other clip is train; `_background_noise_/` is not a word and is left out.

SPC-1 (SUPERB keyword spotting): 12 classes, the ten words `yes no up down left right on off stop go`,
`_unknown_` for every other word and `_silence_`. Train and val come from the v0.01 archive as above,
except that `testing_list.txt` clips are left out (SUPERB discards them); the test set is the
separate test archive, whose folders are already the 12 classes. SUPERB crops `_silence_` clips at
random from the six background-noise recordings on the fly; a fixed manifest needs fixed clips, so
each recording is cut into non-overlapping one-second clips, the last tenth of each recording going
to val and the rest to train (our documented choice).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import soundfile as sf

from ajepa.datasets.manifest import MISSING_COLUMNS, Built
from ajepa.datasets.registry import SPC1_WORDS
from ajepa.datasets.sources import Located
from ajepa.errors import AjepaError

BACKGROUND = "_background_noise_"
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"
UNKNOWN, SILENCE = "_unknown_", "_silence_"
SPC1_CLASSES = [*SPC1_WORDS, UNKNOWN, SILENCE]
SILENCE_CLIP_S = 1.0
SILENCE_VAL_FRACTION = 0.1


def read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise AjepaError(f"{path}: split list not found (expected the Speech Commands layout)") from None
    return [line.strip() for line in lines if line.strip()]


def word_clips(root: Path) -> tuple[list[str], list[str]]:
    """(word folders, 'word/file.wav' for every clip), both sorted; the noise folder is not a word."""
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != BACKGROUND and not d.name.startswith("."))
    clips = sorted(f"{w}/{p.name}" for w in words for p in (root / w).iterdir() if p.suffix.lower() == ".wav")
    return words, clips


def _listed_missing(listed: dict[str, list[str]], present: set[str], split_of: dict[str, str]) -> pd.DataFrame:
    rows = [(rel[:-4], split_of[name], name, "file not found")
            for name, entries in listed.items() for rel in entries if rel not in present]
    return pd.DataFrame(rows, columns=MISSING_COLUMNS)


def build_spc2(located: Located, workdir: Path, cfg=None) -> Built:
    root = located.roots["main"]
    words, clips = word_clips(root)
    val, test = read_list(root / VALIDATION_LIST), read_list(root / TESTING_LIST)
    split = {**{c: "val" for c in val}, **{c: "test" for c in test}}
    rows = pd.DataFrame({"clip_id": [c[:-4] for c in clips], "path": [str(root / c) for c in clips],
                         "labels": [c.split("/")[0] for c in clips], "fold": 0,
                         "split": [split.get(c, "train") for c in clips]})
    missing = _listed_missing({VALIDATION_LIST: val, TESTING_LIST: test}, set(clips),
                              {VALIDATION_LIST: "val", TESTING_LIST: "test"})
    return Built(rows, words, missing, {"words": len(words)})


def build_spc1(located: Located, workdir: Path, cfg=None) -> Built:
    root, test_root = located.roots["main"], located.roots["test"]
    _, clips = word_clips(root)
    val, test_list = read_list(root / VALIDATION_LIST), set(read_list(root / TESTING_LIST))
    val_set = set(val)
    kept = [c for c in clips if c not in test_list]
    word = [c.split("/")[0] for c in kept]
    rows = [pd.DataFrame({"clip_id": [c[:-4] for c in kept], "path": [str(root / c) for c in kept],
                          "labels": [w if w in SPC1_WORDS else UNKNOWN for w in word], "fold": 0,
                          "split": ["val" if c in val_set else "train" for c in kept]})]
    silence, silence_meta = cut_silence(root / BACKGROUND, workdir / "silence")
    rows.append(silence)
    rows.append(_test_rows(test_root))
    missing = _listed_missing({VALIDATION_LIST: val}, set(clips), {VALIDATION_LIST: "val"})
    return Built(pd.concat(rows, ignore_index=True), list(SPC1_CLASSES), missing, {
        "left_out_testing_list": len(clips) - len(kept), "silence": silence_meta})


def _test_rows(test_root: Path) -> pd.DataFrame:
    ids, paths, labels = [], [], []
    for d in sorted(p for p in test_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name not in SPC1_CLASSES:
            raise AjepaError(f"{d}: unexpected folder in the SPC-1 test set (expected the 12 classes "
                             f"{', '.join(SPC1_CLASSES)})")
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() == ".wav"):
            ids.append(f"test/{d.name}/{f.stem}")
            paths.append(str(f))
            labels.append(d.name)
    if not ids:
        raise AjepaError(f"{test_root}: no test clips (expected <class>/<file>.wav folders)")
    return pd.DataFrame({"clip_id": ids, "path": paths, "labels": labels, "fold": 0, "split": "test"})


def cut_silence(noise_dir: Path, out_dir: Path) -> tuple[pd.DataFrame, dict]:
    """One-second `_silence_` clips cut from each background-noise recording, written as WAV files."""
    recordings = sorted(noise_dir.glob("*.wav")) if noise_dir.is_dir() else []
    if not recordings:
        raise AjepaError(f"{noise_dir}: no background-noise recordings to cut _silence_ clips from")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, paths, splits, sources = [], [], [], {}
    for rec in recordings:
        try:
            info = sf.info(str(rec))
            data, sr = sf.read(str(rec), dtype="int16" if info.subtype == "PCM_16" else "float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise AjepaError(f"{rec}: unreadable background-noise recording: {' '.join(str(e).split())}") from None
        step = int(round(SILENCE_CLIP_S * sr))
        n = len(data) // step
        n_val = max(1, round(SILENCE_VAL_FRACTION * n)) if n >= 2 else 0
        for k in range(n):
            name = f"{rec.stem}_{k:03d}.wav"
            sf.write(out_dir / name, data[k * step:(k + 1) * step], sr, subtype=info.subtype)
            ids.append(f"{SILENCE}/{rec.stem}_{k:03d}")
            paths.append(str(out_dir / name))
            splits.append("val" if k >= n - n_val else "train")
        sources[rec.name] = {"clips": n, "val": n_val}
    rows = pd.DataFrame({"clip_id": ids, "path": paths, "labels": SILENCE, "fold": 0, "split": splits})
    return rows, {"clip_s": SILENCE_CLIP_S, "val_fraction": SILENCE_VAL_FRACTION, "recordings": sources}
