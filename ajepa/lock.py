"""One process at a time per stage state folder.

Two `ajepa pretrain` at once (a `dvc repro` and a `snakemake` started side by side, or a job submitted
twice) would resume from the same checkpoint and overwrite each other's. A stage holds an exclusive
`flock` on a file in its state folder while it runs: the kernel drops the lock when the process ends,
however it ends, so `kill -9` leaves nothing stale to clean up. While the lock is held the file
holds the holder's PID, so that a second process can say whom it waits for; it is emptied on release,
so every finished run leaves the same empty file. It is named in `.dvcignore`: it is no output.
Whoever takes the lock removes the temporaries a killed holder left mid-write (see ajepa.atomic).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from ajepa.atomic import make_parent, write_errors
from ajepa.errors import AjepaError

__all__ = ["LOCK_NAME", "state_lock"]

LOCK_NAME = ".ajepa.lock"


@contextlib.contextmanager
def state_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock of `folder` (created if missing) for the block; refuse at once when another process
    holds it. `what` names the command in the message (e.g. "ajepa pretrain")."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    with write_errors(folder):  # a read-only or full mount: one line, before any work
        make_parent(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise AjepaError(f"{folder} is in use by another {what} (PID {holder}); wait for it to end or stop "
                             "it, then rerun (it resumes from the last checkpoint)") from None
        except OSError as e:  # a file system without locks (some Lustre or NFS mounts): run, but say so
            print(f"{what}: warning: cannot lock {folder} ({e.strerror}); do not start a second {what} on it "
                  "until this one ends", file=sys.stderr)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _remove_temporaries(folder)
        yield path
    finally:
        if locked:  # empty again: a finished run leaves the same (empty) file whoever ran it
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock; the file stays (deleting it would race with the next holder)


def _remove_temporaries(folder: Path) -> None:
    """What a holder killed mid-write left (ajepa.atomic's `.NAME.*.tmp`): no one else writes here now."""
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
