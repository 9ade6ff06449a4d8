"""Write every output under a temporary name and rename it into place.

A killed stage then leaves either the old output or the new one, never half of one; DVC and
Snakemake both decide what to rerun from what exists, so a half-written file would poison them.

    .NAME.<pid>-<random>.tmp   the output being written by process <pid>
    .NAME.old-<pid>            an existing directory output set aside while <pid> renames the new
                               one into place, then deleted

A directory cannot be swapped for another in one rename, so replacing one takes two renames (old
aside, new into place). A process killed between them leaves only the aside; the next write of the
same output (the next start of the stage that owns it) puts it back, and deletes the temporary
names of processes that no longer run. A full disk or an exceeded quota while writing becomes one
AjepaError naming the path and the free space left on its file system; a read-only or forbidden
target one naming the path. An output never replaces a path of another kind: a folder where a file
is to go (or a file where a folder is to go) is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ajepa.errors import AjepaError, Interrupted

# errors that no retry inside the stage can fix: the user must free space or change the target; of
# these, a read-only or forbidden target is no matter of space
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


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
    if seen.errno in READ_ONLY_ERRNOS:  # no space to free: the mount or the folder is not writable
        return AjepaError(f"{path}: cannot write: {os.strerror(seen.errno)}; write elsewhere (or make it "
                          "writable) and rerun")
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


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() and not path.is_symlink() else "file"


def check_replaceable(path: str | os.PathLike, kind: str) -> None:
    """Refuse, before any work, an output `path` that holds another kind of thing than the `kind`
    ("file" or "folder") about to be written there: a folder is never deleted to install a file (it may
    hold a user's data under a name that happens to match an output), nor a file to install a folder."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and _kind(path) != kind:
        raise AjepaError(f"{path}: is a {_kind(path)}, where a {kind} is to be written; it is left as it is: "
                         f"move it away or choose another output name")


def _install(tmp: Path, path: Path) -> None:
    check_replaceable(path, _kind(tmp))
    if _kind(path) == "file":
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
    try:
        shutil.rmtree(aside)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the new output is in place, so finish the tidying
        shutil.rmtree(aside, ignore_errors=True)
        raise Interrupted(getattr(e, "signum", signal.SIGINT),
                          f"{str(e) or 'interrupted'} after {path} was written in full (the new one is in "
                          "place; nothing to redo for it)") from None


def make_parent(path: str | os.PathLike) -> None:
    """Create the folder `path` goes in; a file in the way is one line naming it."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), parent)
        raise AjepaError(f"{path}: cannot create its folder: {blocker} is a file, not a folder") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) and rename it onto `path` on success."""
    path = Path(path)
    with write_errors(path):
        make_parent(path)
        recover(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller creates a file or a directory under this unique name
    try:
        with write_errors(path):
            yield tmp
            _install(tmp, path)
    finally:
        _remove(tmp)


def fsync(path: str | os.PathLike) -> None:
    """Flush a written file to the disk before it is renamed into place: without it a crash soon after
    the rename can leave the new name pointing at unwritten blocks on some file systems (the rename is
    atomic for the name, not for the data)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
