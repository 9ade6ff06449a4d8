from pathlib import Path

import numpy as np
from conftest import tree_digest

from ajepa.datasets import synth
from ajepa.datasets.manifest import esc50_layout, unlabeled_rows

SPEC = synth.GeneratorSpec(seed=7, duration_s=1.0, sample_rate=16000, snr_db=(5.0, 30.0))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    synth.generate(tmp_path / "a", SPEC, clips_per_class=5, num_folds=5, pool_clips=6)
    synth.generate(tmp_path / "b", SPEC, clips_per_class=5, num_folds=5, pool_clips=6, workers=2)  # processes: same files
    other = synth.GeneratorSpec(seed=8, duration_s=1.0, sample_rate=16000, snr_db=(5.0, 30.0))
    synth.generate(tmp_path / "c", other, clips_per_class=5, num_folds=5, pool_clips=6)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout_parses_as_esc50(tmp_path):
    synth.generate(tmp_path, SPEC, clips_per_class=10, num_folds=5, pool_clips=7)
    rows, classes = esc50_layout(tmp_path, meta_csv="meta/synth.csv")
    assert classes == list(synth.CLASSES) and len(classes) >= 10
    assert len(rows) == 10 * len(classes)
    # every class has every fold, evenly
    per = rows.groupby(["labels", "fold"]).size()
    assert set(rows["fold"]) == {1, 2, 3, 4, 5} and (per == 2).all()
    assert all(Path(p).exists() for p in rows["path"])
    # ESC-50 file naming: {fold}-{src}-{take}-{target}.wav
    for p, fold, label in zip(rows["path"], rows["fold"], rows["labels"]):
        f, _, take, target = Path(p).stem.split("-")
        assert int(f) == fold and take == "A" and classes[int(target)] == label
    pool = unlabeled_rows(tmp_path, "meta/pool.csv", "pool")
    assert len(pool) == 7 and (pool["split"] == "pretrain").all() and (pool["labels"] == "").all()


def test_clips_are_16k_audio_in_range():
    for i, category in enumerate(synth.CLASSES):
        x = synth.clip(SPEC, synth.LABELED, i, category)
        assert x.dtype == np.float32 and len(x) == 16000
        assert np.abs(x).max() <= 0.7 + 1e-6 and np.std(x) > 1e-3


def test_mirror_pairs_are_time_reversals_in_distribution():
    """Glide direction changes the trajectory, not the pitch range: the per-clip mean spectrum of the
    two classes agrees far better than either does with an unrelated class."""
    def mean_spectrum(category):
        spectra = []
        for i in range(40):
            x = synth.clip(SPEC, synth.LABELED, 1000 + i, category)
            spectra.append(np.log(np.abs(np.fft.rfft(x)[:8000]) ** 2 + 1e-6).reshape(-1, 50).mean(1))
        return np.mean(spectra, 0)

    rise, fall, clicks = (mean_spectrum(c) for c in ("rising_glide", "falling_glide", "slow_clicks"))
    assert np.abs(rise - fall).mean() < 0.25 * np.abs(rise - clicks).mean()


def test_gain_range_sets_the_clip_level():
    import dataclasses
    peaks = {}
    for name, gain in (("fixed", (0.0, 0.0)), ("varied", (-12.0, 0.0))):
        spec = dataclasses.replace(SPEC, gain_db=gain)
        peaks[name] = np.array([np.abs(synth.clip(spec, synth.LABELED, i, c)).max()
                                for i, c in enumerate(synth.CLASSES)])
    assert np.allclose(peaks["fixed"], 0.7, atol=1e-6)  # peak-normalised to 0.7, then the gain
    assert peaks["varied"].min() >= 0.7 * 10 ** (-12 / 20) - 1e-6 and peaks["varied"].max() <= 0.7 + 1e-6
    assert peaks["varied"].std() > 0.01
