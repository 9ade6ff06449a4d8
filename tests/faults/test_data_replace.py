"""`kill -9` while an output directory is replaced leaves the old tree or the new one, never a part;
the next write of that output restores or tidies what the killed process left.

The child replaces a tree with the library's atomic_path. To land the kill at one exact point, the
child's own copy of os.replace or shutil.rmtree stops there (after doing its real work) and tells
the test, which then sends SIGKILL: the kill is real, only its moment is chosen."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ajepa.atomic import atomic_path

CHILD = textwrap.dedent("""
    import os, shutil, sys, time
    from pathlib import Path
    from ajepa.atomic import atomic_path

    target, where, signal_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def stop():
        signal_file.write_text("here")
        time.sleep(600)

    def replace(src, dst):
        real_replace(src, dst)
        if where == "after first rename" and Path(src) == target:
            stop()

    def rmtree(path, *args, **kwargs):
        tree = Path(path)
        if where == "inside the delete" and (tree / "generation").is_file() \\
                and (tree / "generation").read_text() == "old":
            real_rmtree(tree / "pool")  # part of the old tree is gone, as a real delete goes
            stop()
        real_rmtree(path, *args, **kwargs)

    os.replace, shutil.rmtree = replace, rmtree
    with atomic_path(target) as tmp:
        if where == "while writing":
            (tmp / "audio").mkdir(parents=True)
            stop()
        for sub in ("audio", "pool"):
            (tmp / sub).mkdir(parents=True)
            (tmp / sub / "clip.wav").write_text("new")
        (tmp / "generation").write_text("new")
""")


def _tree(root: Path, generation: str) -> None:
    for sub in ("audio", "pool"):
        (root / sub).mkdir(parents=True)
        (root / sub / "clip.wav").write_text(generation)
    (root / "generation").write_text(generation)


def _state(root: Path) -> str:
    """'old' or 'new' for a whole tree, 'absent', or 'partial: <files>'."""
    if not root.exists():
        return "absent"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    for generation in ("old", "new"):
        if files == ["audio/clip.wav", "generation", "pool/clip.wav"] and \
                all((root / f).read_text() == generation for f in files):
            return generation
    return f"partial: {files}"


def _kill_at(tmp_path: Path, target: Path, where: str) -> None:
    signal_file = tmp_path / "signal"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(target), where, str(signal_file)],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 60
    while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL) if child.poll() is None else None
    child.wait()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["while writing", "after first rename", "inside the delete"])
def test_kill_during_replace_leaves_old_or_new_and_the_next_start_tidies(tmp_path, where):
    target = tmp_path / "data" / "raw" / "synth"
    _tree(target, "old")
    _kill_at(tmp_path, target, where)

    state = _state(target)
    asides = [p for p in target.parent.iterdir() if ".old-" in p.name]
    # between its two renames the name is briefly absent: the old tree is then whole under its aside
    assert state in ("old", "new") or (state == "absent" and [_state(p) for p in asides] == ["old"]), \
        (state, asides)

    # the next start of the writer (here one that fails before installing anything)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            raise RuntimeError("a stage that fails")
    assert _state(target) == ("new" if state == "new" else "old")
    assert sorted(p.name for p in target.parent.iterdir()) == ["synth"]  # no .tmp, no .old-* left


@pytest.mark.slow
def test_a_file_output_killed_while_written_leaves_no_orphan(tmp_path):
    target = tmp_path / "manifest.csv"
    target.write_text("old\n")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from ajepa.atomic import atomic_path
        with atomic_path(sys.argv[1]) as tmp:
            tmp.write_text("half")
            Path(sys.argv[2]).write_text("here")
            time.sleep(600)
    """))
    child = subprocess.Popen([sys.executable, str(script), str(target), str(tmp_path / "signal")],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 60
    while not (tmp_path / "signal").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert target.read_text() == "old\n"
    assert len(list(tmp_path.glob(".manifest.csv.*.tmp"))) == 1  # the killed writer's temporary file
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n"
    assert not list(tmp_path.glob(".manifest.csv.*"))
