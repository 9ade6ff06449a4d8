import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import noise_wavs

from ajepa.data.frontend import FrontEnd
from ajepa.data.store import FeatureStore, extract_features
from ajepa.errors import AjepaError


def _manifest(tmp_path, n_good=6):
    paths = noise_wavs(tmp_path, n_good, 8000, 1000, prefix="good")
    rng = np.random.default_rng(0)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, np.float32), 16000)
    silent_header = tmp_path / "zero_frames.wav"
    sf.write(silent_header, np.zeros(0, np.float32), 16000)
    missing = tmp_path / "missing.wav"
    bad = [corrupt, empty, text, short, silent_header, missing]
    paths += [str(p) for p in bad]
    n = len(paths)
    return pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "path": paths, "labels": "x", "fold": 0,
                         "split": "train"}), n_good, len(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_clips_rejected_with_reasons_rest_processed(tmp_path, workers):
    manifest, n_good, n_bad = _manifest(tmp_path)
    s = extract_features(manifest, tmp_path / "feat", FrontEnd(), target_length=64, shard_clips=4,
                         num_workers=workers, max_reject_fraction=0.5, progress=False)
    assert (s.accepted, s.rejected) == (n_good, n_bad)
    rejects = pd.read_csv(tmp_path / "feat" / "rejects.csv").set_index("path")["reason"]
    assert len(rejects) == n_bad
    assert rejects[str(tmp_path / "empty.wav")].startswith("unreadable audio")
    assert rejects[str(tmp_path / "notes.wav")].startswith("unreadable audio")
    assert rejects[str(tmp_path / "corrupt.wav")].startswith("unreadable audio")
    assert rejects[str(tmp_path / "missing.wav")].startswith("unreadable audio")
    assert rejects[str(tmp_path / "short.wav")].startswith("too short")
    assert rejects[str(tmp_path / "zero_frames.wav")] == "empty: no samples"
    store = FeatureStore(tmp_path / "feat")
    assert len(store) == n_good and set(store.index["clip_id"]) == {f"c{i}" for i in range(n_good)}
    assert store.stats["rejected"] == n_bad and store.stats["accepted"] == n_good
    for i in range(n_good):  # every accepted clip points at a filled row
        assert np.abs(store.raw(i)[:40].astype(np.float32)).sum() > 0


def test_threshold_stops_stage_and_keeps_previous_output(tmp_path):
    manifest, n_good, n_bad = _manifest(tmp_path)
    out = tmp_path / "feat"
    extract_features(manifest.iloc[:n_good], out, FrontEnd(), 64, 4, 1, 0.0, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(AjepaError) as e:
        extract_features(manifest, out, FrontEnd(), 64, 4, 1, max_reject_fraction=0.2, progress=False)
    msg = str(e.value)
    assert f"{n_bad} of {n_good + n_bad} clips rejected" in msg and "max_reject_fraction 20.0%" in msg
    assert "\n" not in msg
    # nothing half-written: the old store is intact, the rejects list is kept aside, and the finished
    # shards wait in the work folder (no other temporary is left)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".feat.partial"]
    listed = pd.read_csv(tmp_path / "feat.rejects.csv")
    assert len(listed) == n_bad
    # a rerun that accepts the rejects keeps every shard instead of computing them again
    s = extract_features(manifest, out, FrontEnd(), 64, 4, 1, max_reject_fraction=0.5, progress=False)
    assert s.kept_shards == -(-len(manifest) // 4) and s.rejected == n_bad
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stats_use_training_splits_only(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i, gain in enumerate([0.1, 0.1, 100.0]):
        p = tmp_path / f"{i}.wav"
        sf.write(p, (gain * rng.standard_normal(16000)).astype(np.float32), 16000, subtype="FLOAT")
        paths.append(str(p))
    base = dict(clip_id=["a", "b", "c"], path=paths, labels="", fold=0)
    extract_features(pd.DataFrame({**base, "split": ["train", "pretrain", "test"]}), tmp_path / "f1", FrontEnd(),
                     64, 8, 1, 0.0, progress=False)
    extract_features(pd.DataFrame({**base, "split": ["train", "pretrain", "train"]}), tmp_path / "f2", FrontEnd(),
                     64, 8, 1, 0.0, progress=False)
    m1, m2 = FeatureStore(tmp_path / "f1").mean, FeatureStore(tmp_path / "f2").mean
    # +60 dB on one clip of three adds ln(1e6)/3 = 4.6 to the mean, but only when it is a training clip
    assert m2 > m1 + 3


def test_store_errors_name_the_directory(tmp_path):
    with pytest.raises(AjepaError, match="not a feature store"):
        FeatureStore(tmp_path)


def test_workers_give_identical_shards(tmp_path):
    manifest, n_good, _ = _manifest(tmp_path)
    manifest = manifest.iloc[:n_good]
    extract_features(manifest, tmp_path / "one", FrontEnd(), 64, 4, 1, 0.0, progress=False)
    extract_features(manifest, tmp_path / "two", FrontEnd(), 64, 4, 2, 0.0, progress=False)
    for name in ["shard-00000.npy", "shard-00001.npy", "index.csv"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.slow
def test_a_worker_its_parent_never_recorded_ends_with_the_parent():
    """Before, a SIGTERM to `features` between a worker's fork and its parent recording it left that worker
    waiting for a task forever (it held the parent's end of its own pipe), with the parent's stderr open."""
    script = """
import multiprocessing as mp, sys
from ajepa.data import store
from ajepa.data.frontend import FrontEnd
ctx = mp.get_context("fork")
conn, child = ctx.Pipe()
worker = ctx.Process(target=store._serve, args=(child, FrontEnd(), [conn.fileno()]), daemon=False)
worker.start()
print(worker.pid, flush=True)
import os; os._exit(0)  # gone without ending it, as a stop between the fork and procs.append
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr  # its stderr closed: the worker ended, quietly
