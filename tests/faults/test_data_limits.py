"""`features` under the limits of a shared machine: a kill, a typo that asks for a huge store, a cap
on processes. A killed run resumes shard by shard; a store that cannot fit is refused before any
block is reserved; a worker that cannot start is one line, never a hang."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from train_project import ENV, cwd, smoke_params, start, wait_for, write_params

from ajepa.cli import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A project with the synthetic set prepared (400 pool clips) and small shards, features not run."""
    root = tmp_path_factory.mktemp("limits")
    p = smoke_params()
    p["datasets"]["synth"]["prepare"]["pool_clips"] = 400
    p["features"].update(shard_clips=8, num_workers=1)
    write_params(root, p)
    with cwd(root):
        assert main(["prepare", "synth"]) == 0
    return root


def _copy(src: Path, dest: Path, **features) -> Path:
    shutil.copytree(src, dest)
    p = yaml.safe_load((dest / "params.yaml").read_text())
    p["features"].update(features)
    write_params(dest, p)
    return dest


def _ajepa(root: Path, *args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ajepa.cli", *args], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=120, preexec_fn=preexec)


def _store(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "data/features/synth").iterdir())}


@pytest.mark.slow
def test_a_killed_features_run_resumes_by_shard_to_the_same_store(prepared, tmp_path):
    straight = _copy(prepared, tmp_path / "straight")
    assert _ajepa(straight, "features", "synth").returncode == 0
    killed = _copy(prepared, tmp_path / "killed")
    done = killed / "data/features/.synth.partial/done"
    proc = start(killed, "features", "synth")
    try:
        wait_for(lambda: done.is_dir() and len(list(done.glob("shard-*.json"))) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    finished = len(list(done.glob("shard-*.json")))
    assert 3 <= finished < 55 and not (killed / "data/features/synth").exists()
    # a damaged finished shard is found by its checksum and computed again, not kept
    damaged = killed / "data/features/.synth.partial/shard-00000.npy"
    with open(damaged, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x00\x7c")
    r = _ajepa(killed, "features", "synth")
    assert r.returncode == 0, r.stderr[-2000:]
    kept = int(r.stdout.split("; ")[-1].split()[0])
    assert finished - 1 <= kept <= finished and f"{kept} shards kept from a stopped run" in r.stdout
    assert _store(killed) == _store(straight)
    assert not (killed / "data/features/.synth.partial").exists()


def _file_size_cap():
    # a safety net: were the size check missing, the allocation would stop at 64 MiB, not fill the disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))


@pytest.mark.slow
def test_a_typo_in_target_length_is_refused_before_any_allocation(prepared, tmp_path):
    root = _copy(prepared, tmp_path / "p")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["datasets"]["synth"]["target_length"] = 9600000
    write_params(root, p)
    r = _ajepa(root, "features", "synth", preexec=_file_size_cap)
    assert r.returncode != 0
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "datasets.synth.target_length" in line and "9600000" in line, line
    assert not (root / "data/features").exists() or not any((root / "data/features").iterdir())


def _pids_cgroup() -> Path | None:
    """A fresh cgroup of the pids controller (v1 or v2) for this test, or None where none can be made."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (base.name == "pids" and (base / "cgroup.procs").exists()) or "pids" in _read(base / "cgroup.subtree_control"):
            try:
                return Path(tempfile.mkdtemp(prefix="ajepa-test-", dir=base))
            except OSError:
                return None
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove_group(group: Path) -> None:
    deadline = time.monotonic() + 30
    while True:  # its last processes may still be on their way out
        try:
            return group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("workers, cap, ok", [(40, 8, True), (4, 4, False)])
def test_worker_pools_are_sized_to_the_work_and_a_failed_spawn_is_one_line(prepared, tmp_path, workers, cap, ok):
    """With a cap on tasks (a cgroup's pids.max, as a cluster job may have; RLIMIT_NPROC does not
    hold for root): 40 workers asked for 3 tasks start 3 and pass; 4 workers that cannot all start
    fail at once in one line."""
    group = _pids_cgroup()
    if group is None:
        pytest.skip("no pids cgroup can be made here")
    root = _copy(prepared, tmp_path / "p", num_workers=workers, shard_clips=32 if ok else 8)
    if ok:  # 3 shards of 32 clips: 3 tasks
        manifest = root / "data/manifests/synth.csv"
        manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:97]))
    try:
        (group / "pids.max").write_text(str(cap))
        r = _ajepa(root, "features", "synth", preexec=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        _remove_group(group)
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        line = r.stderr.replace("\r", "\n").strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "cannot start 4 worker processes" in line and "features.num_workers" in line, line
