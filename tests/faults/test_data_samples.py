"""A clip with finite but absurd sample values is rejected by name; it never reaches the statistics."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from data_clips import FRONTEND, RATE, TARGET_LENGTH, write_clips

from ajepa.data.store import extract_features


@pytest.mark.parametrize("peak", [1e30, 1e4])  # the documented bound is 1e3
def test_huge_samples_are_rejected_and_statistics_stay_finite(tmp_path, peak):
    manifest = write_clips(tmp_path / "audio", 5)
    loud = tmp_path / "audio" / "loud.wav"
    samples = 0.1 * np.random.default_rng(1).standard_normal(RATE // 2)
    samples[100] = peak
    sf.write(loud, samples.astype(np.float32), RATE, subtype="FLOAT")
    manifest = pd.concat([manifest, pd.DataFrame({"clip_id": ["loud"], "path": [str(loud)], "labels": "noise",
                                                  "fold": 1, "split": "train"})], ignore_index=True)

    summary = extract_features(manifest, tmp_path / "features", FRONTEND, TARGET_LENGTH, shard_clips=4,
                               num_workers=1, max_reject_fraction=0.5, progress=False)

    assert (summary.accepted, summary.rejected) == (5, 1)
    rejects = pd.read_csv(tmp_path / "features" / "rejects.csv")
    assert rejects["path"].tolist() == [str(loud)]
    assert "out of range" in rejects["reason"].iloc[0]
    stats = json.loads((tmp_path / "features" / "stats.json").read_text())
    assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0
    assert stats["rejected"] == 1
    # the statistics are those of the five good clips alone
    alone = extract_features(manifest.iloc[:5], tmp_path / "alone", FRONTEND, TARGET_LENGTH, shard_clips=4,
                             num_workers=1, max_reject_fraction=0.0, progress=False)
    assert (summary.mean, summary.std) == pytest.approx((alone.mean, alone.std))


def test_samples_at_full_scale_are_kept(tmp_path):
    manifest = write_clips(tmp_path / "audio", 3)
    sf.write(manifest["path"].iloc[0], np.full(RATE // 2, 0.999, dtype=np.float32) * np.sign(
        np.random.default_rng(2).standard_normal(RATE // 2)).astype(np.float32), RATE, subtype="FLOAT")
    summary = extract_features(manifest, tmp_path / "features", FRONTEND, TARGET_LENGTH, shard_clips=4,
                               num_workers=1, max_reject_fraction=0.0, progress=False)
    assert summary.rejected == 0
