"""distributed.stage_to: the pretraining pool copied to a local folder, verified against the checksums the
features stage records, reused when intact, copied anew when damaged; pretraining over the copy."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import pool_features, tiny_params

from ajepa.cli import main
from ajepa.data.staging import RECORD, expand_target, stage_store
from ajepa.data.store import CHECKSUMS, FeatureStore, sha256_file
from ajepa.errors import AjepaError
from ajepa.export import read_export
from ajepa.tools.scale import readonly_supported


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """24 one-second clips in shards of 4: six shard files."""
    root = tmp_path_factory.mktemp("staging")
    return pool_features(root, root / "data" / "features" / "synth", seed=8, clips=24, shard_clips=4)


def test_the_store_records_every_shards_size_and_checksum(store):
    sums = json.loads((store / CHECKSUMS).read_text())
    shards = sorted(p.name for p in store.glob("shard-*.npy"))
    assert sorted(sums) == shards and len(shards) == 6
    for name in shards:
        assert sums[name] == {"size": (store / name).stat().st_size, "sha256": sha256_file(store / name)}


def test_staging_copies_then_reuses_then_recopies_a_damaged_shard(store, tmp_path):
    dest = tmp_path / "local" / "synth"
    files = sorted(p.name for p in store.iterdir() if p.is_file())
    first = stage_store(store, dest)
    assert (first.copied, first.reused) == (len(files), 0)
    assert first.bytes_copied == sum((store / f).stat().st_size for f in files)
    for f in files:
        assert (dest / f).read_bytes() == (store / f).read_bytes()
    a, b = FeatureStore(store), FeatureStore(dest)
    assert all(np.array_equal(a.raw(i), b.raw(i)) for i in range(len(a)))

    again = stage_store(store, dest)
    assert (again.copied, again.reused) == (0, len(files))

    # same size, other bytes: a staged shard damaged after it was verified
    shard = dest / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF
    shard.write_bytes(bytes(data))
    fixed = stage_store(store, dest)
    assert (fixed.copied, fixed.reused) == (1, len(files) - 1)
    assert shard.read_bytes() == (store / shard.name).read_bytes()
    assert json.loads((dest / RECORD).read_text())[shard.name]["sha256"] == sha256_file(shard)
    # no temporary name left behind, and a file of another store is removed
    (dest / "shard-00099.npy").write_bytes(b"stale")
    stage_store(store, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, RECORD, ".staging.lock"])


def test_a_damaged_store_is_refused_and_nothing_passes_for_its_copy(store, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(store, src)
    shard = src / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(AjepaError, match=r"shard-00001.npy: its copy in .* the store records .*rerun"):
        stage_store(src, tmp_path / "dest")
    assert not (tmp_path / "dest" / "shard-00001.npy").exists()
    assert not [p for p in (tmp_path / "dest").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.skipif(not readonly_supported(), reason="no mount namespace here for a small tmpfs")
def test_a_target_without_room_is_one_line_before_any_copy(store, tmp_path):
    dest = tmp_path / "small"
    dest.mkdir()
    code = f"from ajepa.data.staging import stage_store; stage_store({str(store)!r}, " \
           f"{str(dest / 'synth')!r})"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f'mount -t tmpfs -o size=64k tmpfs "{dest}" && exec "$0" -c "$1"', sys.executable, code],
                       capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0
    need = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
    assert "distributed.stage_to:" in last and f"needs {need / 1024:.1f} KiB" in last and "free on" in last, last
    assert not list(dest.iterdir())  # the tmpfs is gone with its namespace; nothing was written under it


def test_stage_to_expands_the_jobs_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("AJEPA_NODE_DISK", str(tmp_path))
    assert expand_target("$AJEPA_NODE_DISK/ajepa") == tmp_path / "ajepa"
    monkeypatch.delenv("AJEPA_NODE_DISK")
    unset = r"distributed.stage_to: '\$AJEPA_NODE_DISK/ajepa': \$AJEPA_NODE_DISK is not set"
    with pytest.raises(AjepaError, match=unset):
        expand_target("$AJEPA_NODE_DISK/ajepa")


@pytest.mark.slow  # a training run
def test_pretraining_from_the_staged_copy_gives_the_same_weights(store, tmp_path, monkeypatch, capsys):
    weights = {}
    for name, stage_to in (("in_place", None), ("staged", "$AJEPA_NODE_DISK/job")):
        root = tmp_path / name
        shutil.copytree(store, root / "data" / "features" / "synth")
        p = tiny_params()
        p["pretrain"]["optim"]["epochs"] = 1
        p["pretrain"]["datasets"] = ["synth"]
        p["pretrain"]["probe"]["every"] = 0
        p["distributed"].update(processes=1, device="cpu", stage_to=stage_to)
        (root / "params.yaml").write_text(yaml.safe_dump(p))
        monkeypatch.chdir(root)
        monkeypatch.setenv("AJEPA_NODE_DISK", str(tmp_path / "node"))
        assert main(["pool", "synth"]) == 0
        assert main(["pretrain"]) == 0, capsys.readouterr().err
        weights[name] = read_export(root / "models" / "pretrain" / "context")[1]
    err = capsys.readouterr().err
    files = len([p for p in store.iterdir() if p.is_file()])
    staged = tmp_path / "node" / "job" / "synth"
    assert f"staged data/features/synth to {staged}: {files} files copied and verified" in err
    assert sorted(weights["staged"]) == sorted(weights["in_place"])
    assert all(np.array_equal(weights["staged"][k].numpy(), weights["in_place"][k].numpy()) for k in weights["staged"])
