"""Matrices too large to hold: a float array [N, ...] kept on disk as a .npy file, written as its rows are
computed and read back by rows, so that memory is bounded by a block of rows, not by N.

Reads are positional (`os.pread` into a fresh buffer), not through a memory map: the pages of a map that
has been read stay counted in the process's resident set (RSS) until the kernel needs them, so a full
pass over a 50 GB map looks to a job scheduler like a 50 GB process. The file's pages still sit in the
page cache, which the kernel drops under pressure and no memory limit counts as the process's own.
The file is a plain .npy (`np.load` reads it), so an older in-memory cache of the same name stays valid.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ajepa.atomic import atomic_path
from ajepa.errors import AjepaError

__all__ = ["ArrayRows", "RowFile", "Rows", "as_rows", "write_rows"]


def write_rows(path: Path, n: int, batches: Iterable[np.ndarray], what: str) -> Path:
    """Write the row batches (each [b, ...], in order, n rows in all) as one .npy file at `path`, atomically,
    one batch in memory at a time. Rows that are not finite stop the write with one line naming `what`
    (the encoder or input they came from), since a NaN embedding silently turns every probe score to chance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for batch in batches:
                batch = np.ascontiguousarray(batch)
                if written == 0:  # the header needs the row shape and dtype, known from the first batch
                    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(batch.dtype),
                                                             "fortran_order": False, "shape": (n, *batch.shape[1:])})
                bad = int((~np.isfinite(batch)).reshape(len(batch), -1).any(1).sum())
                if bad:
                    raise AjepaError(f"{what}: {bad} of the {len(batch)} clips of one batch give non-finite values "
                                     "(NaN or inf): its weights, normalisation or input are damaged")
                f.write(batch.tobytes())
                written += len(batch)
        if written != n:
            raise AjepaError(f"{path}: {written} rows computed, {n} expected")
    return path


class Rows:
    """What the probes read: rows of a matrix by position, from memory (ArrayRows) or disk (RowFile)."""

    name: str
    shape: tuple
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, positions) -> np.ndarray:
        """The rows at `positions`, as a fresh array the caller owns (the probe standardises it in place)."""
        raise NotImplementedError

    def blocks(self, positions: np.ndarray, rows: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(slice of `positions`, their rows) for every run of at most `rows` positions, in order."""
        for start in range(0, len(positions), rows):
            part = slice(start, min(start + rows, len(positions)))
            yield part, self.read(positions[part])


class ArrayRows(Rows):
    """Rows of an array already in memory."""

    def __init__(self, array: np.ndarray, name: str = "embeddings in memory"):
        self.array, self.name, self.shape, self.dtype = array, name, array.shape, array.dtype

    def read(self, positions) -> np.ndarray:
        return self.array[np.asarray(positions, dtype=np.int64)]


class RowFile(Rows):
    """Rows of a C-ordered .npy file, read with positional reads (contiguous positions in one read each)."""

    def __init__(self, path: Path):
        self.path, self.name = Path(path), str(path)
        try:
            with open(self.path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                self.shape, fortran, self.dtype = header(f)
                self.offset = f.tell()
        except ValueError as e:
            raise AjepaError(f"{path}: not a .npy file ({e}); delete it and rerun") from None
        size = self.offset + len(self) * self.row_bytes
        if fortran or not self.shape or self.path.stat().st_size != size:
            raise AjepaError(f"{path}: cut or damaged ({self.path.stat().st_size} bytes, {size} expected for "
                             f"{self.shape} {self.dtype}); delete it and rerun")

    def read(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        if not len(positions):
            return out
        view = out.reshape(len(positions), -1).view(np.uint8)
        # runs of consecutive positions: one read each
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for run in np.split(np.arange(len(positions)), breaks):
                first, count = int(positions[run[0]]), len(run)
                self._fill(fd, view[run[0]:run[0] + count].reshape(-1), first)
        finally:
            os.close(fd)
        return out


    def _fill(self, fd: int, buffer: np.ndarray, first: int) -> None:
        """buffer <- the bytes of the rows from `first` on (one read gives at most ~2 GiB on Linux: loop)."""
        done, offset = 0, self.offset + first * self.row_bytes
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise AjepaError(f"{self.path}: cut short at row {first}; delete it and rerun")
            done += got


def as_rows(x) -> Rows:
    """Rows as they are, or an array in memory wrapped as rows."""
    return x if isinstance(x, Rows) else ArrayRows(np.asarray(x))
