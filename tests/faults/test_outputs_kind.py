"""Outputs never destroy what is in their way: a folder where a file output goes (or a file where a
folder output goes) is refused and kept; a file where an output's folder should be, a read-only
target and a Ctrl-C while the old tree is deleted are one line each, and leave nothing behind."""

import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
from exports import make_export
from train_project import ENV

from ajepa.atomic import atomic_path
from ajepa.cli import main
from ajepa.errors import AjepaError


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    return path


@pytest.mark.parametrize("blocker", ["emb.csv", "emb.npz", "emb.rejects.csv"])
def test_embed_never_deletes_a_folder_in_the_way_of_its_outputs(tmp_path, clip, blocker, capsys):
    (tmp_path / blocker).mkdir()
    (tmp_path / blocker / "thesis.tex").write_text("years of work")
    export = make_export(tmp_path / "export")
    assert main(["embed", str(clip), "--encoder", str(export), "--out", str(tmp_path / "emb.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ajepa embed: error: {tmp_path / blocker}: is a folder, where a file is to be written; it is "
                   "left as it is: move it away or choose another output name"), err
    assert (tmp_path / blocker / "thesis.tex").read_text() == "years of work"


def test_a_folder_output_never_replaces_a_file(tmp_path):
    target = tmp_path / "features"
    target.write_text("a user's file")
    with pytest.raises(AjepaError, match="is a file, where a folder is to be written"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "shard.npy").write_text("new")
    assert target.read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no temporary left


def test_an_out_whose_parent_is_a_file_is_one_line(tmp_path, clip, capsys):
    (tmp_path / "notes").write_text("a file")
    export = make_export(tmp_path / "export")
    assert main(["embed", str(clip), "--encoder", str(export), "--out", str(tmp_path / "notes" / "e.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ajepa embed: error: {tmp_path / 'notes' / 'e.npz'}: cannot create its folder: " \
                  f"{tmp_path / 'notes'} is a file, not a folder", err


STOP_IN_DELETE = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from ajepa.atomic import atomic_path
    from ajepa.errors import Interrupted
    from ajepa.interrupt import StopSignals

    target, signal_file = Path(sys.argv[1]), Path(sys.argv[2])
    real_rmtree, stopped = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        if ".old-" in Path(path).name and not stopped:  # the old tree's delete: stop there, once
            stopped.append(1)
            real_rmtree(Path(path) / "pool")  # part of it is gone, as a real delete goes
            signal_file.write_text("here")
            time.sleep(600)
        real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    StopSignals().install()
    try:
        with atomic_path(target) as tmp:
            (tmp / "pool").mkdir(parents=True)
            (tmp / "generation").write_text("new")
    except Interrupted as e:
        print(e)
        sys.exit(130)
""")


@pytest.mark.slow
def test_ctrl_c_while_the_old_tree_is_deleted_finishes_the_delete_and_says_the_new_one_is_in_place(tmp_path):
    target = tmp_path / "store"
    (target / "pool").mkdir(parents=True)
    (target / "pool" / "clip.npy").write_text("old")
    (target / "generation").write_text("old")
    script = tmp_path / "child.py"
    script.write_text(STOP_IN_DELETE)
    child = subprocess.Popen([sys.executable, str(script), str(target), str(tmp_path / "signal")], env=ENV,
                             stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "signal").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 130, out
    assert out.strip() == f"stopped by SIGINT after {target} was written in full (the new one is in place; " \
                          "nothing to redo for it)", out
    assert (target / "generation").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "signal", "store"]  # no aside left


def _unshare_works() -> bool:
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt && mount -o remount,ro /mnt"],
                       capture_output=True) if shutil.which("unshare") else None
    return r is not None and r.returncode == 0


LOCK = textwrap.dedent("""
    import sys
    from ajepa.errors import AjepaError
    from ajepa.lock import state_lock
    try:
        with state_lock(sys.argv[1], "ajepa pretrain"):
            pass
    except AjepaError as e:
        print(e)
        sys.exit(2)
""")


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="no unprivileged user namespaces to mount a read-only tmpfs")
@pytest.mark.parametrize("state", ["models/pretrain_state", "data/embeddings/synth"])
def test_a_read_only_state_folder_is_one_line_that_does_not_ask_for_space(tmp_path, state):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "child.py"
    script.write_text(LOCK)
    cmd = (f"mount -t tmpfs tmpfs {disk} && mkdir -p {disk / state} && mount -o remount,ro {disk} && "
           f"{sys.executable} {script} {disk / state}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and r.stderr == "", (r.stdout, r.stderr[-2000:])
    assert r.stdout.strip() == f"{disk / state}: cannot write: Read-only file system; write elsewhere (or make it " \
                               "writable) and rerun", r.stdout
