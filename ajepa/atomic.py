"""Write every output under a temporary name and rename it into place.

A killed stage then leaves either the old output or the new one, never half of one; DVC and
Snakemake both decide what to rerun from what exists, so a half-written file would poison them.

    .NAME.<pid>-<random>.tmp   the output being written by process <pid>
    .NAME.old-<pid>            an existing directory output set aside while <pid> renames the new
                               one into place, then deleted

A directory cannot be swapped for another in one rename, so replacing one takes two renames (old
aside, new into place). A process killed between them leaves only the aside; the next write of the
same output (the next start of the stage that owns it) puts it back, and deletes the temporary
names of processes that no longer run. A full disk, an exceeded quota or a read-only file system
while writing becomes one AjepaError naming the path and the free space left on its file system.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ajepa.errors import AjepaError

# errors that no retry inside the stage can fix: the user must free space or change the target
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def free_space(path: str | os.PathLike) -> str:
    """'12.3 GiB free on /mnt' for the file system holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(p).free
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f"{free:.1f} {unit} free on {mount}" if unit != "B" else f"{free} B free on {mount}"


def space_error(path: str | os.PathLike, error: BaseException) -> AjepaError | None:
    """The one-line error for a write that failed for lack of space (also when a library wrapped
    the OSError in its own exception, as torch.save does), or None for any other failure."""
    seen = error
    while seen is not None and not (isinstance(seen, OSError) and seen.errno in SPACE_ERRNOS):
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    if seen is None:
        return None
    return AjepaError(f"{path}: cannot write: {os.strerror(seen.errno)} ({free_space(path)}); "
                      f"free some space (or write elsewhere) and rerun")


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write for lack of space inside the block into space_error's one-line error."""
    try:
        yield
    except AjepaError:
        raise
    except Exception as e:
        error = space_error(path, e)
        if error is None:
            raise
        raise error from None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover(path: str | os.PathLike) -> None:
    """Undo what a killed writer of `path` left: put back a directory set aside by a replace that
    did not finish, and delete the temporary names and asides of processes no longer running."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)-[^.]+\.tmp|old-(\d+))$")
    for entry in sorted(path.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or _alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and not (path.exists() or path.is_symlink()):
            os.replace(entry, path)  # the old output, whole: the new one never took its name
        else:
            _remove(entry)


def _install(tmp: Path, path: Path) -> None:
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)  # a file (or nothing) is replaced in one atomic rename
        return
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(aside)
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) and rename it onto `path` on success."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller creates a file or a directory under this unique name
    try:
        with write_errors(path):
            yield tmp
            _install(tmp, path)
    finally:
        _remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
