"""Tiny copies of the published datasets in their exact distributed layouts, built by the tests.

Each builder writes the archive(s) or files under their registry names into `served` (the folder
the loopback server serves) and returns what a correct manifest must contain:
{clip_id: (labels, split, fold)} plus the list of clips the listings name but the copy lacks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf


def wav_bytes(seconds: float, sample_rate: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "./") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def md5_of(path: Path) -> str:
    return "md5:" + hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# ESC-50: ESC-50-master/{audio/*.wav, meta/esc50.csv}

ESC50_CLASSES = ["dog", "rooster", "pig"]  # targets 0, 1, 2 as in the real set


def esc50(served: Path, drop: tuple[str, ...] = ()) -> dict:
    files, expected, lines = {}, {}, []
    for target, category in enumerate(ESC50_CLASSES):
        for fold in range(1, 6):
            src = 100000 + 10 * target + fold
            name = f"{fold}-{src}-A-{target}.wav"
            lines.append([name, fold, target, category, target == 0, src, "A"])
            if name not in drop:
                files[f"ESC-50-master/audio/{name}"] = wav_bytes(0.5, 44100, src)
                expected[name[:-4]] = (category, "train", fold)
    meta = io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
    writer.writerows(lines)
    files["ESC-50-master/meta/esc50.csv"] = meta.getvalue().encode()
    files["ESC-50-master/README.md"] = b"# ESC-50\n"
    write_zip(served / "ESC-50-master.zip", files)
    return {"clips": expected, "missing": [d[:-4] for d in drop], "files": ["ESC-50-master.zip"]}


# ---------------------------------------------------------------------------------------------
# Speech Commands: <word>/<speaker>_nohash_<n>.wav, _background_noise_/, validation_list.txt, testing_list.txt

SPEAKERS = ["0a7c2a8d", "0b09edd3", "0c40e715"]


def _speech_commands_tree(words, val, test, noise_seconds, seed0=0):
    files, clips = {}, []
    for w, word in enumerate(words):
        for s, speaker in enumerate(SPEAKERS):
            rel = f"{word}/{speaker}_nohash_0.wav"
            files[rel] = wav_bytes(1.0, 16000, seed0 + 10 * w + s)
            clips.append(rel)
    for name, seconds in noise_seconds.items():
        files[f"_background_noise_/{name}"] = wav_bytes(seconds, 16000, len(name))
    files["_background_noise_/README.md"] = b"noise\n"
    files["validation_list.txt"] = "".join(f"{v}\n" for v in val).encode()
    files["testing_list.txt"] = "".join(f"{t}\n" for t in test).encode()
    files["LICENSE"] = b"CC BY 4.0\n"
    return files, clips


SPC2_WORDS = ["backward", "no", "yes"]
SPC2_VAL = ["no/0b09edd3_nohash_0.wav", "yes/0b09edd3_nohash_0.wav"]
SPC2_TEST = ["backward/0c40e715_nohash_0.wav", "yes/0c40e715_nohash_0.wav"]


def spc2(served: Path) -> dict:
    files, clips = _speech_commands_tree(SPC2_WORDS, SPC2_VAL, SPC2_TEST, {"white_noise.wav": 2.0})
    write_tar(served / "speech_commands_v0.02.tar.gz", files)
    split = {**{v: "val" for v in SPC2_VAL}, **{t: "test" for t in SPC2_TEST}}
    expected = {c[:-4]: (c.split("/")[0], split.get(c, "train"), 0) for c in clips}
    return {"clips": expected, "missing": [], "files": ["speech_commands_v0.02.tar.gz"]}


SPC1_MAIN_WORDS = ["bed", "cat", "no", "yes"]  # bed and cat are not among the ten: _unknown_
SPC1_VAL = ["yes/0b09edd3_nohash_0.wav", "bed/0b09edd3_nohash_0.wav"]
SPC1_TEST_LIST = ["no/0c40e715_nohash_0.wav", "cat/0c40e715_nohash_0.wav"]
SPC1_NOISE = {"white_noise.wav": 3.0, "running_tap.wav": 2.5}  # 3 + 2 one-second _silence_ clips
SPC1_TEST_CLASSES = ["yes", "no", "_unknown_", "_silence_"]


def spc1(served: Path) -> dict:
    files, clips = _speech_commands_tree(SPC1_MAIN_WORDS, SPC1_VAL, SPC1_TEST_LIST, SPC1_NOISE)
    write_tar(served / "speech_commands_v0.01.tar.gz", files)
    test_files = {}
    expected = {}
    for c in clips:
        if c in SPC1_TEST_LIST:
            continue
        word = c.split("/")[0]
        expected[c[:-4]] = (word if word in ("yes", "no") else "_unknown_", "val" if c in SPC1_VAL else "train", 0)
    for k, label in enumerate(SPC1_TEST_CLASSES):
        for j in range(2):
            name = f"{label}/{'bed_' if label == '_unknown_' else ''}{SPEAKERS[j]}_nohash_{j}.wav"
            test_files[name] = wav_bytes(1.0, 16000, 500 + 10 * k + j)
            expected[f"test/{name[:-4]}"] = (label, "test", 0)
    # silence: each recording cut into one-second clips, the last tenth (at least one) to val
    for stem, n, n_val in (("running_tap", 2, 1), ("white_noise", 3, 1)):
        for k in range(n):
            expected[f"_silence_/{stem}_{k:03d}"] = ("_silence_", "val" if k >= n - n_val else "train", 0)
    write_tar(served / "speech_commands_test_set_v0.01.tar.gz", test_files)
    return {"clips": expected, "missing": [],
            "files": ["speech_commands_v0.01.tar.gz", "speech_commands_test_set_v0.01.tar.gz"]}


# ---------------------------------------------------------------------------------------------
# AudioSet: segment CSVs (3-line '#' header, quoted MID lists), class_labels_indices.csv; audio is ours

AUDIOSET_CLASSES = [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking"), ("/m/04rlf", "Music"),
                    ("/m/0bt9lr", "Dog")]
# YTID -> MIDs; the how: the file this copy has for it (None = missing)
BALANCED = {
    "--PJHxphWEs": (["/m/09x0r", "/m/05zppz"], "YTID.flac"),
    "-0RWZT-miFs": (["/m/04rlf"], "YTID_start_end.wav"),
    "0FqRvqRahcU": (["/m/0bt9lr"], "Y+YTID.wav"),
    "YfRkt3p6Qas": (["/m/09x0r"], "sub/Y+YTID.wav"),  # a YTID that itself starts with Y
    "_kH3y8N1f2o": (["/m/04rlf", "/m/09x0r"], "dup"),  # both .wav and .flac: the flac is used
    "a1b2c3d4e5f": (["/m/0bt9lr"], "m4a"),  # only in a format libsndfile cannot read
    "zZ9_-xY8wV7": (["/m/04rlf"], None),
    "Q0w9E8r7T6y": (["/m/09x0r"], "YTID.wav"),
}
UNBALANCED = {
    "u1U2u3U4u5U": (["/m/09x0r"], "YTID.wav"),
    "u6U7u8U9u0U": (["/m/04rlf"], None),
    "uAuBuCuDuEu": (["/m/0bt9lr", "/m/04rlf"], "YTID_start_end.wav"),
}
EVAL = {
    "e1E2e3E4e5E": (["/m/09x0r"], "YTID.wav"),
    "e6E7e8E9e0E": (["/m/0bt9lr"], None),
    "eAeBeCeDeEe": (["/m/04rlf", "/m/05zppz"], "Y+YTID.wav"),
}


def _segments_csv(path: Path, segments: dict) -> None:
    labels = {m for mids, _ in segments.values() for m in mids}
    lines = ["# Segments csv created Sun Mar  5 10:54:31 2017",
             f"# num_ytids={len(segments)}, num_segs={len(segments)}, num_unique_labels={len(labels)}, "
             f"num_positive_labels={sum(len(m) for m, _ in segments.values())}",
             "# YTID, start_seconds, end_seconds, positive_labels"]
    for ytid, (mids, _) in segments.items():
        lines.append(f'{ytid}, 30.000, 40.000, "{",".join(mids)}"')
    path.write_text("\n".join(lines) + "\n")


def audioset(served: Path, audio_dir: Path) -> dict:
    (served / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(AUDIOSET_CLASSES)))
    _segments_csv(served / "balanced_train_segments.csv", BALANCED)
    _segments_csv(served / "unbalanced_train_segments.csv", UNBALANCED)
    _segments_csv(served / "eval_segments.csv", EVAL)
    audio_dir.mkdir(parents=True, exist_ok=True)
    (audio_dir / "notes.txt").write_text("not audio\n")
    sf.write(audio_dir / "unrelated_name.wav", np.zeros(1600, np.float32), 16000)
    used = {}
    for seed, (ytid, (_, how)) in enumerate({**BALANCED, **UNBALANCED, **EVAL}.items()):
        if how is None:
            continue
        names = {"YTID.flac": [f"{ytid}.flac"], "YTID.wav": [f"{ytid}.wav"],
                 "YTID_start_end.wav": [f"{ytid}_30.000_40.000.wav"], "Y+YTID.wav": [f"Y{ytid}.wav"],
                 "sub/Y+YTID.wav": [f"sub/Y{ytid}.wav"], "dup": [f"{ytid}.wav", f"{ytid}.flac"],
                 "m4a": [f"{ytid}.m4a"]}[how]
        for name in names:
            path = audio_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".m4a"):
                path.write_bytes(b"\x00\x00\x00\x18ftypM4A not really")
            else:
                data, sr = sf.read(io.BytesIO(wav_bytes(1.0, 16000, 900 + seed)))
                sf.write(path, data, sr, format="FLAC" if name.endswith(".flac") else "WAV")
        used[ytid] = audio_dir / names[-1]
    names = dict(AUDIOSET_CLASSES)
    labels = {ytid: ";".join(names[m] for m in mids) for ytid, (mids, _) in {**BALANCED, **UNBALANCED, **EVAL}.items()}
    return {"files": ["balanced_train_segments.csv", "unbalanced_train_segments.csv", "eval_segments.csv",
                      "class_labels_indices.csv"], "audio": used, "labels": labels}


# ---------------------------------------------------------------------------------------------
# VoxCeleb1: dev zip in four pieces (parta{a,b,c,d}) + test zip, both wav/idXXXXX/<video>/<nnnnn>.wav

VOX_DEV = ["id10001/1zcIwhmdeo4/00001.wav", "id10001/1zcIwhmdeo4/00002.wav", "id10001/7w0IBEWc9Qw/00001.wav",
           "id10002/0_laIeN-Q44/00001.wav", "id10002/6WO410QOeuo/00001.wav", "id10002/C7k7C-PDvAA/00001.wav"]
VOX_TEST = ["id10270/5r0dWxy17C8/00001.wav", "id10270/5r0dWxy17C8/00002.wav", "id10270/OmSWVqpb-N0/00001.wav"]
VOX_SPLIT = {  # the identification split covers every speaker in all three subsets
    "id10001/1zcIwhmdeo4/00001.wav": "1", "id10001/1zcIwhmdeo4/00002.wav": "1", "id10001/7w0IBEWc9Qw/00001.wav": "3",
    "id10002/0_laIeN-Q44/00001.wav": "1", "id10002/6WO410QOeuo/00001.wav": "2", "id10002/C7k7C-PDvAA/00001.wav": "3",
    "id10270/5r0dWxy17C8/00001.wav": "1", "id10270/5r0dWxy17C8/00002.wav": "2", "id10270/OmSWVqpb-N0/00001.wav": "3",
    "id10002/ZZZZZZZZZZZ/00009.wav": "1",  # listed, but not in this copy
}


def vox1(served: Path, pieces: bool = True) -> dict:
    dev = write_zip(served / "vox1_dev_wav.zip",
                    {f"wav/{rel}": wav_bytes(0.6, 16000, 700 + i) for i, rel in enumerate(VOX_DEV)})
    write_zip(served / "vox1_test_wav.zip", {f"wav/{rel}": wav_bytes(0.6, 16000, 800 + i) for i, rel in enumerate(VOX_TEST)})
    files = ["vox1_test_wav.zip", "iden_split.txt"]
    if pieces:
        data = dev.read_bytes()
        q = len(data) // 4
        for k, letter in enumerate("abcd"):
            (served / f"vox1_dev_wav_parta{letter}").write_bytes(data[k * q: (k + 1) * q if k < 3 else len(data)])
            files.append(f"vox1_dev_wav_parta{letter}")
        dev.unlink()
    (served / "iden_split.txt").write_text("".join(f"{s} {rel}\n" for rel, s in VOX_SPLIT.items()))
    splits = {"1": "train", "2": "val", "3": "test"}
    expected = {rel[:-4]: (rel.split("/")[0], splits[s], 0) for rel, s in VOX_SPLIT.items() if "ZZZ" not in rel}
    return {"clips": expected, "missing": ["id10002/ZZZZZZZZZZZ/00009"], "files": files}
