"""Safe extraction of zip and tar archives, and a reader over archives split into pieces.

Every member is checked before anything is written for it, and the archive is refused (with the
member named) when a member has an absolute path, a `..` component, is a device, FIFO or socket, is
a symbolic or hard link that resolves outside the target, or would be written through a link that
leads outside. Callers extract into a temporary directory (ajepa.atomic) that is deleted on error,
so a refused archive leaves nothing behind, inside the target or outside it. An archive that is
truncated or corrupt (the stream ends early, a checksum inside fails) is a BrokenArchive: one line
naming the file, never a decompressor's traceback.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from ajepa.errors import AjepaError
from ajepa.paths import escapes
from ajepa.progress import progress


class UnsafeArchive(AjepaError):
    """An archive member that could write outside the target directory."""


class BrokenArchive(AjepaError):
    """An archive that cannot be read to its end: truncated, corrupt, or not an archive at all."""


# what the tar, zip and decompression modules raise for bytes that end early or do not decode
_BROKEN = (EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class ConcatenatedFile(io.RawIOBase):
    """A read-only, seekable view of several files as one (VoxCeleb1's dev set comes in four pieces
    of one zip), so the pieces are read in place instead of being copied into a 30 GB file first."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:done + min(len(view) - done, self._starts[i] + self._sizes[i] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def open_archive(paths: list[Path]) -> BinaryIO:
    """One file, or the concatenation of several pieces, as a seekable binary stream."""
    if len(paths) == 1:
        return open(paths[0], "rb")
    return io.BufferedReader(ConcatenatedFile(paths), buffer_size=1 << 20)


def extract(paths: list[Path], target: Path, label: str | None = None) -> int:
    """Extract a zip or tar archive (given as one file or its pieces, in order) into `target`.

    Returns the number of members written. The format is detected from the content, not the name.
    Raises BrokenArchive for an archive that cannot be read to its end.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    label = label or paths[0].name
    remedy = "delete it (or replace it with a whole copy) and rerun"
    try:
        with open_archive(paths) as stream:
            if zipfile.is_zipfile(stream):
                stream.seek(0)
                return _extract_zip(stream, target, label)
            stream.seek(0)
            try:
                tar = tarfile.open(fileobj=stream, mode="r:*")
            except tarfile.TarError:
                raise BrokenArchive(f"{label}: neither a zip nor a tar archive (truncated or not an archive?): "
                                    f"{remedy}") from None
            with tar:
                return _extract_tar(tar, target, label)
    except _BROKEN as e:
        raise BrokenArchive(f"{label}: truncated or corrupt archive ({type(e).__name__}: {e}): {remedy}") from None
    except OSError as e:
        if e.errno is not None:
            raise  # the file system's own error (a full disk): not the archive's fault
        raise BrokenArchive(f"{label}: truncated or corrupt archive ({e}): {remedy}") from None


def _member_path(name: str, target: Path, label: str) -> Path | None:
    """The destination of a member, after the name checks; None for the archive's root entry."""
    if reason := escapes(name):
        raise UnsafeArchive(f"{label}: member {name!r} has {reason}: refusing to extract")
    parts = [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]
    if not parts:
        return None
    dest = target.joinpath(*parts)
    # an earlier (checked) link could still make a later member's parent lead elsewhere
    if not _inside(os.path.realpath(dest), target):
        raise UnsafeArchive(f"{label}: member {name!r} would be written through a link leading outside "
                            f"the target: refusing to extract")
    return dest


def _inside(path: str, target: Path) -> bool:
    root = os.path.realpath(target)
    return os.path.commonpath([root, path]) == root


def _check_link(name: str, link: str, dest: Path, target: Path, label: str, hard: bool) -> None:
    if link.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", link):
        raise UnsafeArchive(f"{label}: member {name!r} links to the absolute path {link!r}: refusing to extract")
    # symbolic links resolve from the folder the link really is in (which an earlier link may have
    # moved), hard links from the archive root
    base = os.path.realpath(target) if hard else os.path.realpath(dest.parent)
    if not _inside(os.path.realpath(os.path.normpath(os.path.join(base, link))), target):
        raise UnsafeArchive(f"{label}: member {name!r} links to {link!r}, outside the target: refusing to extract")


# extraction filters: Python 3.12, and 3.10.12 / 3.11.4 onwards
HAS_TAR_FILTERS = hasattr(tarfile, "data_filter")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, label: str) -> None:
    if not HAS_TAR_FILTERS:
        # the checks of _extract_tar are the whole guard here; nothing of the archive's owners, modes
        # (setuid bits) or times is applied: the files get this user and the umask
        tar.extract(member, target, set_attrs=False)
        return
    try:
        # the 'data' filter repeats these checks and drops setuid bits and foreign owners
        tar.extract(member, target, filter="data")
    except tarfile.FilterError as e:
        raise UnsafeArchive(f"{label}: member {member.name!r} refused: {e}") from None


def _extract_tar(tar: tarfile.TarFile, target: Path, label: str) -> int:
    count = 0
    with progress(None, f"extract {label}", "file") as bar:
        for member in tar:
            dest = _member_path(member.name, target, label)
            if dest is None:
                continue
            if member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise UnsafeArchive(f"{label}: member {member.name!r} is a device or special file: refusing to extract")
            if member.issym() or member.islnk():
                _check_link(member.name, member.linkname, dest, target, label, hard=member.islnk())
            _extract_member(tar, member, target, label)
            count += 1
            bar.update(1)
    return count


def _extract_zip(stream: BinaryIO, target: Path, label: str) -> int:
    count = 0
    with zipfile.ZipFile(stream) as zf:
        infos = zf.infolist()
        with progress(len(infos), f"extract {label}", "file") as bar:
            for info in infos:
                dest = _member_path(info.filename, target, label)
                bar.update(1)
                if dest is None:
                    continue
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)
                if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                    raise UnsafeArchive(f"{label}: member {info.filename!r} is a device or special file: "
                                        f"refusing to extract")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                if kind == stat.S_IFLNK:
                    link = zf.read(info).decode("utf-8", "surrogateescape")
                    _check_link(info.filename, link, dest, target, label, hard=False)
                    if dest.is_symlink() or dest.exists():
                        dest.unlink()
                    os.symlink(link, dest)
                else:
                    if dest.is_symlink():
                        dest.unlink()  # replace the link itself rather than write through it
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                count += 1
    return count
