"""Features where the data lives, the DVC way: the project's cache on another file system (`dvc cache dir`)
with link outputs (`cache.type symlink`), so the feature store's bytes exist once, in that cache, and the
stages read them through links; pretraining's own reading of such a store."""

import os

import numpy as np
import pytest
from conftest import make_project_copy, run, tiny_params

from ajepa.data.store import FeatureStore


@pytest.mark.slow
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_features_are_links_into_a_cache_outside_the_repository(tmp_path, link):
    p = tiny_params()
    for section, key in (("pipeline", "datasets"), ("pipeline", "benchmarks"), ("pretrain", "datasets")):
        p[section][key] = ["synth"]
    root = make_project_copy(tmp_path / "repo", p)
    cache = tmp_path / "big-filesystem" / "dvc-cache"
    # per user and not committed (.dvc/config.local): where this machine keeps the data, how to link it
    run(["dvc", "cache", "dir", "--local", str(cache)], root)
    run(["dvc", "config", "--local", "cache.type", link], root)
    run(["dvc", "repro", "pool@synth"], root, env={**os.environ, "OMP_NUM_THREADS": "2"})

    store = root / "data" / "features" / "synth"
    files = sorted(p for p in store.iterdir() if p.is_file() or p.is_symlink())
    assert any(p.name.startswith("shard-") for p in files) and (store / "stats.json") in files
    cached = {str(p) for p in cache.rglob("*") if p.is_file()}
    for f in files:
        if link == "symlink":
            assert f.is_symlink() and os.path.realpath(f) in cached, f
        else:
            assert not f.is_symlink() and f.stat().st_nlink >= 2, f
            assert any(os.path.samefile(f, c) for c in cached), f
    # the stages read the linked store as they read a plain one
    s = FeatureStore(store, ("pretrain",))
    assert len(s) == 24 and np.isfinite(s.raw(0).astype(np.float32)).all()
    assert (root / "data" / "pool" / "synth.json").is_file()
    status = run(["dvc", "status", "pool@synth"], root).stdout
    assert "changed" not in status
