"""A feature store copied to node-local disk before pretraining reads it (distributed.stage_to).

Pretraining reads every clip of its pool once per epoch, at random: about 1.1 GB/s of 256 KiB reads
for the paper's run (docs/compute.md), which a shared file system rarely serves. The store can stay
where the data lives (the DVC cache, a project file system) and be copied once per job to a local
disk, `$TMPDIR` on most clusters. Every file of the copy is checked against the store: the shards
against the size and sha256 that `ajepa features` recorded in the store's checksums.json (hashed
from the store itself where an older store has none), the small tables against their own bytes.

A later job on the same node reuses what a former one copied: a staged file whose size and
modification time are those recorded when it was verified (.staged.json in the copy) is trusted
without reading it again, so every process of a run may call this; any other staged file is hashed
again and copied anew unless it matches. Each file is copied under a temporary name and renamed into
place once verified, so a killed copy leaves no file that passes for a good one. One process at a time
stages into a folder (an flock): the others wait for it, then find everything in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ajepa.atomic import atomic_path, free_space, make_parent, write_errors, write_json
from ajepa.data.store import CHECKSUMS, sha256_file
from ajepa.errors import AjepaError

RECORD = ".staged.json"  # in a staged copy: {file name: {"size", "sha256", "mtime_ns"}} of verified files
LOCK = ".staging.lock"


@dataclass(frozen=True)
class Staged:
    root: Path  # the staged copy, a feature store
    copied: int  # files copied by this call
    reused: int  # files already in place and verified
    bytes_copied: int


def expand_target(value: str, key: str = "distributed.stage_to") -> Path:
    """`value` with ~ and environment variables ($TMPDIR, ${SLURM_JOB_ID}) expanded; an unset variable
    is one line naming it (left as it is, it would become a folder named '$TMPDIR')."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    if "$" in expanded:
        raise AjepaError(f"{key}: {value!r}: {expanded[expanded.index('$'):].split('/')[0]} is not set in this "
                         f"job's environment")
    return Path(expanded)


def store_files(src: Path) -> dict[str, tuple[int, str]]:
    """{file name: (size, sha256)} of every file of the store `src`: the shards from its checksums.json
    (hashed here when it has none), the other files hashed here (small tables)."""
    try:
        recorded = json.loads((src / CHECKSUMS).read_text())
    except FileNotFoundError:
        recorded = {}
    except (OSError, ValueError) as e:
        raise AjepaError(f"{src / CHECKSUMS}: unreadable ({e}); rerun `ajepa features`") from None
    files = {}
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        entry = recorded.get(path.name)
        files[path.name] = (entry["size"], entry["sha256"]) if entry else (path.stat().st_size, sha256_file(path))
    return files


def stage_store(src: str | os.PathLike, dest: str | os.PathLike) -> Staged:
    """Make `dest` a verified copy of the feature store `src` (see the module's docstring)."""
    src, dest = Path(src), Path(dest)
    if not (src / "stats.json").is_file():
        raise AjepaError(f"{src}: not a feature store (no stats.json; run `ajepa features` first)")
    if dest.resolve() == src.resolve():
        raise AjepaError(f"distributed.stage_to: {dest} is the store itself; name another folder")
    with _staging_lock(dest):
        expected = store_files(src)
        record = _read_record(dest)
        todo = [name for name in expected if not _in_place(dest / name, expected[name], record)]
        _check_room(src, dest, sum(expected[name][0] for name in todo), len(todo))
        for i, name in enumerate(todo):
            record[name] = _copy_verified(src / name, dest / name, *expected[name])
            if i % 64 == 63:  # a killed copy then keeps most of what it verified without hashing it again
                write_json(dest / RECORD, record)
        for stale in set(p.name for p in dest.iterdir() if p.is_file()) - set(expected) - {RECORD, LOCK}:
            (dest / stale).unlink()  # a file of an earlier, different store: never read, only taking space
            record.pop(stale, None)
        write_json(dest / RECORD, record)
    return Staged(dest, len(todo), len(expected) - len(todo), sum(expected[name][0] for name in todo))


@contextlib.contextmanager
def _staging_lock(dest: Path):
    with write_errors(dest):
        make_parent(dest / LOCK)
        fd = os.open(dest / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: the renames still keep it whole
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_record(dest: Path) -> dict:
    try:
        record = json.loads((dest / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _in_place(path: Path, want: tuple[int, str], record: dict) -> bool:
    """Whether the staged `path` is the store's file: its recorded verification still holds (same size,
    same modification time, same checksum as the store's), or hashing it again says so (recorded then)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    size, sha = want
    if st.st_size != size:
        return False
    seen = record.get(path.name) or {}
    if seen.get("sha256") == sha and seen.get("size") == size and seen.get("mtime_ns") == st.st_mtime_ns:
        return True
    if sha256_file(path) != sha:
        return False
    record[path.name] = {"size": size, "sha256": sha, "mtime_ns": st.st_mtime_ns}
    return True


def _check_room(src: Path, dest: Path, need: int, files: int) -> None:
    free = shutil.disk_usage(dest).free
    if need > free:
        raise AjepaError(f"distributed.stage_to: {dest}: staging {files} files of {src} needs "
                         f"{_human(need)} and there is {free_space(dest)}; free space there, stage to a "
                         f"larger disk, or set distributed.stage_to to null to read the store where it is")


def _human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _copy_verified(src: Path, dest: Path, size: int, sha: str) -> dict:
    """Copy `src` to `dest` under a temporary name, check the copy's size and sha256, rename it into place."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        got = (tmp.stat().st_size, sha256_file(tmp))
        if got != (size, sha):
            raise AjepaError(f"{src}: its copy in {dest.parent} is {got[0]} bytes with sha256 {got[1][:12]}..., the "
                             f"store records {size} bytes, {sha[:12]}...: the store changed or is damaged since "
                             f"`ajepa features` wrote it (rerun it), or the copy was (rerun this)")
    return {"size": size, "sha256": sha, "mtime_ns": dest.stat().st_mtime_ns}
