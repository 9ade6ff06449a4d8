"""The embedded spoken-words generator: deterministic, speaker-disjoint, in the Speech Commands layout,
and speech-like where it matters for the benchmark."""

from pathlib import Path

import numpy as np
import torch
from conftest import tree_digest

from ajepa.data.frontend import FrontEnd
from ajepa.datasets import words
from ajepa.datasets.manifest import unlabeled_rows
from ajepa.datasets.sources import Located
from ajepa.datasets.speech_commands import build_spc2

SPEC = words.GeneratorSpec(seed=5, duration_s=1.0, sample_rate=16000, snr_db=(20.0, 30.0))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = dict(speakers=(2, 1, 1), repetitions=1, pool_clips=5, pool_speakers=3)
    words.generate(tmp_path / "a", SPEC, **args)
    words.generate(tmp_path / "b", SPEC, workers=2, **args)  # processes: the same files
    other = words.GeneratorSpec(seed=6, duration_s=1.0, sample_rate=16000, snr_db=(20.0, 30.0))
    words.generate(tmp_path / "c", other, **args)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_speech_commands_layout_with_speaker_disjoint_splits(tmp_path):
    table = words.generate(tmp_path, SPEC, speakers=(3, 2, 2), repetitions=2, pool_clips=9, pool_speakers=4)
    built = build_spc2(Located(roots={"main": tmp_path / "audio"}), tmp_path)
    assert built.classes == sorted(words.WORDS) and built.missing.empty
    rows = built.rows
    assert dict(rows["split"].value_counts()) == {"train": 3 * 10 * 2, "val": 2 * 10 * 2, "test": 2 * 10 * 2}
    speaker = rows["clip_id"].str.split("/").str[1].str.split("_nohash_").str[0]
    by_split = {s: set(speaker[rows["split"] == s]) for s in ("train", "val", "test")}
    assert [len(v) for v in by_split.values()] == [3, 2, 2]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    # every speaker says every word the same number of times
    assert (rows.groupby([speaker, rows["labels"]]).size() == 2).all()
    assert set(table["speaker"][table["split"] == "test"]) == {int(s) for s in by_split["test"]}
    pool = unlabeled_rows(tmp_path, "meta/pool.csv", "pool")
    assert len(pool) == 9 and all(Path(p).exists() for p in pool["path"])


def test_pool_speakers_are_never_labeled_speakers():
    split_ids = words.speaker_splits((3, 2, 2))
    labeled = set().union(*map(set, split_ids.values()))
    assert labeled == set(range(7))
    # generate() numbers pool speakers after the labeled ones; a speaker is a pure function of its id
    assert words.speaker(5, 7) == words.speaker(5, 7) and words.speaker(5, 7) != words.speaker(5, 0)


def test_clips_are_audio_in_range_with_the_word_above_the_noise():
    for i, word in enumerate(words.WORDS):
        x = words.clip(SPEC, words.LABELED, i, speaker_id=i, word=word)
        assert x.dtype == np.float32 and len(x) == 16000
        assert np.abs(x).max() <= 0.7 + 1e-6
        frames = x[: len(x) // 160 * 160].reshape(-1, 160)
        energy = (frames ** 2).mean(1)
        assert energy.max() > 30 * np.median(energy)  # a word in 20-30 dB SNR noise, not noise alone


def _band_energy(word: str, n: int = 12) -> np.ndarray:
    """Mean log-mel spectrum of a word over speakers, and its time course in the top band."""
    fe = FrontEnd()
    out = []
    for i in range(n):
        x = words.clip(SPEC, words.LABELED, 500 + i, speaker_id=i, word=word)
        out.append(fe.fbank(torch.from_numpy(x)[None]).numpy())
    return np.stack(out)


def test_words_differ_in_the_spectrum_and_in_time():
    """Fricatives put energy high in frequency ('yes' ends in s); 'no' and 'on' use the same phones in
    the opposite order, so their averaged spectra are alike while the timing of the nasal differs."""
    yes, go = _band_energy("yes"), _band_energy("go")
    high = slice(100, 128)  # mel bins above ~4.5 kHz
    assert yes[:, :, high].max(axis=(1, 2)).mean() > go[:, :, high].max(axis=(1, 2)).mean() + 2.0
    no, on = _band_energy("no"), _band_energy("on")
    mean_no, mean_on, mean_go = (a.mean(axis=(0, 1)) for a in (no, on, go))
    assert np.abs(mean_no - mean_on).mean() < np.abs(mean_no - mean_go).mean() * 1.5


def test_speakers_vary_in_pitch_rate_and_tract():
    spk = [words.speaker(1, i) for i in range(200)]
    f0 = np.array([s.f0 for s in spk])
    tract = np.array([s.tract for s in spk])
    rate = np.array([s.rate for s in spk])
    assert f0.min() < 110 and f0.max() > 200 and np.corrcoef(f0, tract)[0, 1] > 0.5  # a shorter tract (higher formants): a higher voice
    assert rate.max() / rate.min() > 1.5 and tract.max() / tract.min() > 1.4
