"""A full disk is one line naming the path and its free space; a dead feature worker fails the run.

The disk is really full: a 64 KiB tmpfs mounted in a user namespace (`unshare -rm`, no root needed
where the kernel allows unprivileged user namespaces; skipped elsewhere). File size limits
(RLIMIT_FSIZE) give the same EFBIG path for the checkpoint, everywhere."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from data_clips import write_clips

HERE = Path(__file__).resolve().parent


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp && true"],
                       capture_output=True)
    return r.returncode == 0


FEATURES = textwrap.dedent("""
    import sys
    import pandas as pd
    from ajepa.data.store import extract_features
    from ajepa.errors import AjepaError
    from data_clips import FRONTEND, TARGET_LENGTH
    manifest = pd.read_csv(sys.argv[1], dtype={"path": str, "labels": str, "clip_id": str})
    try:
        extract_features(manifest, sys.argv[2], FRONTEND, TARGET_LENGTH, shard_clips=8,
                         num_workers=int(sys.argv[3]), max_reject_fraction=0.0, progress=False)
    except AjepaError as e:
        print(e)
        sys.exit(2)
""")


def _script(tmp_path, text) -> Path:
    path = tmp_path / "child.py"
    path.write_text(text)
    return path


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(HERE), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="no unprivileged user namespaces to mount a small tmpfs")
@pytest.mark.parametrize("workers", [1, 2])
def test_features_on_a_full_disk_fail_in_one_line(tmp_path, workers):
    manifest = write_clips(tmp_path / "audio", 8)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = _script(tmp_path, FEATURES)
    # one shard of 8 x 96 x 128 float16 is 192 KiB: it cannot fit in 64 KiB
    cmd = (f"mount -t tmpfs -o size=64k tmpfs {disk} && "
           f"{sys.executable} {script} {tmp_path / 'manifest.csv'} {disk / 'features'} {workers}; "
           f"rc=$?; ls -A {disk} >&2; exit $rc")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == "", r.stderr  # nothing left on the full disk: no output, no temporary files
    line = r.stdout.strip()
    assert "\n" not in line and "No space left on device" in line and "free on" in line, line
    assert str(disk / "features") in line


@pytest.mark.slow
def test_a_killed_feature_worker_fails_the_run_instead_of_hanging(tmp_path):
    manifest = write_clips(tmp_path / "audio", 7)
    for name in ("stuck", "stuck2"):  # one in each shard of 8: each worker's task blocks
        fifo = tmp_path / "audio" / f"{name}.wav"
        os.mkfifo(fifo)  # opening it blocks until a writer comes: the worker that takes it holds its task
        manifest.loc[len(manifest)] = [name, str(fifo), "noise", 1, "train"]
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    script = _script(tmp_path, FEATURES)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "manifest.csv"),
                              str(tmp_path / "features"), "2"], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        workers = _wait_for_children(child.pid, 2)
        os.kill(workers[0], signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            for pid in _children(child.pid):
                os.kill(pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 2
    assert "worker process died" in out and "free on" in out, out
    assert not (tmp_path / "features").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _wait_for_children(pid: int, n: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(pid)
        if len(kids) >= n:
            time.sleep(0.5)  # let them take their tasks
            return kids
        time.sleep(0.05)
    raise AssertionError(f"no {n} worker processes under {pid} after {timeout} s")


CHECKPOINT = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from ajepa.errors import AjepaError
    from ajepa.train.checkpoint import save_checkpoint
    save_checkpoint(sys.argv[1], {"step": 1, "w": torch.zeros(10)})
    # a file size limit: writes past it fail with EFBIG, like a quota
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        save_checkpoint(sys.argv[1], {"step": 2, "w": torch.zeros(100_000)})
    except AjepaError as e:
        print(e)
        sys.exit(2)
""")


@pytest.mark.slow
def test_checkpoint_save_past_the_space_left_is_one_line_and_keeps_the_old_one(tmp_path):
    import torch

    ckpt = tmp_path / "run" / "checkpoint.pt"
    r = subprocess.run([sys.executable, str(_script(tmp_path, CHECKPOINT)), str(ckpt)], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = r.stdout.strip()
    assert "\n" not in line and str(ckpt) in line and "File too large" in line and "free on" in line, line
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]


DOWNLOAD = textwrap.dedent("""
    import resource, signal, sys
    from ajepa.datasets.download import download
    from ajepa.errors import AjepaError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        download(sys.argv[1], sys.argv[2], backoff_s=5.0)
    except AjepaError as e:
        print(e)
        sys.exit(2)
""")


@pytest.mark.slow
def test_a_download_past_the_space_left_stops_at_once_and_keeps_the_part(tmp_path):
    from loopback import Loopback

    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "data.bin").write_bytes(os.urandom(300_000))
    server = Loopback(tmp_path / "served")
    dest = tmp_path / "downloads" / "data.bin"
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(_script(tmp_path, DOWNLOAD)), f"{server.url}/data.bin", str(dest)],
                           capture_output=True, text=True, timeout=120, env=_env())
    finally:
        server.close()
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = r.stdout.strip()
    assert "\n" not in line and "data.bin.part" in line and "File too large" in line and "free on" in line, line
    assert time.monotonic() - t0 < 15.0  # not retried: two retries alone would wait 5 s + 10 s
    assert not dest.exists() and (tmp_path / "downloads" / "data.bin.part").stat().st_size == 100_000
