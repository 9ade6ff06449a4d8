"""Fetch one file over HTTP(S): resumable, retried, verified, renamed into place only when whole.

    dest.part              the bytes received so far; an interrupted run resumes them (HTTP Range)
    dest                   appears (atomic rename) only when whole: its length is known (published,
                           or announced by the server) and matched, or a known checksum matches; a
                           server that just closes the connection, with no length, for a file with
                           no published size or checksum leaves it at dest.part and says so
    dest.<sha256>.corrupt  a file whose size or checksum did not match (a finished download, or an
                           earlier `dest` that no longer verifies): set aside under a name made from
                           its own content, so nothing is deleted or overwritten, and never used;
                           also an unverified download that does not open as an archive (sources)

Only the standard library is used (urllib), so nothing but Python is needed on a cluster login node.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ajepa.atomic import space_error
from ajepa.errors import AjepaError
from ajepa.progress import progress

CHUNK = 1 << 20
RETRIES = 5  # consecutive failed attempts (an attempt that received bytes resets the count)
BACKOFF_S = 2.0  # wait before retry k is BACKOFF_S * 2**(k - 1)
TIMEOUT_S = 60.0  # per socket operation, not per file
USER_AGENT = "ajepa-prepare/0.1 (+https://arxiv.org/abs/2311.15830)"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ChecksumMismatch(AjepaError):
    """A file whose size or digest differs from the expected one."""


class _Interrupted(Exception):
    """The connection ended before the announced length: resume from what arrived."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # "sha256" or "md5"
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """'sha256:HEX' or 'md5:HEX' (the form params.yaml uses)."""
        algorithm, _, digest = text.partition(":")
        lengths = {"sha256": 64, "md5": 32}
        digest = digest.lower()
        if algorithm not in lengths or len(digest) != lengths[algorithm] or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{text!r}: expected 'sha256:<64 hex digits>' or 'md5:<32 hex digits>'")
        return cls(algorithm, digest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def file_digests(path: Path, algorithms: tuple[str, ...] = ("sha256",), show_progress: bool = False) -> dict[str, str]:
    """Hex digests of a file, all computed in one read."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    size = path.stat().st_size
    with open(path, "rb") as f, progress(size, f"checksum {path.name}", "B", enabled=show_progress and size > 64 * CHUNK,
                                          unit_scale=True, unit_divisor=1024) as bar:
        while block := f.read(CHUNK):
            for h in hashers.values():
                h.update(block)
            bar.update(len(block))
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify(path: Path, size: int | None, checksum: Checksum | None) -> dict[str, str]:
    """Check size then digest; return {"sha256": ..., and the checked algorithm} or raise ChecksumMismatch."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise ChecksumMismatch(f"{path}: size mismatch: expected {size} bytes, got {got_size}")
    algorithms = ("sha256",) if checksum is None or checksum.algorithm == "sha256" else ("sha256", checksum.algorithm)
    digests = file_digests(path, algorithms, show_progress=True)
    if checksum is not None and digests[checksum.algorithm] != checksum.hexdigest:
        raise ChecksumMismatch(f"{path}: {checksum.algorithm} mismatch: expected {checksum.hexdigest}, "
                               f"got {digests[checksum.algorithm]}")
    return digests


def download(url: str, dest: Path, size: int | None = None, checksum: Checksum | None = None, *,
             retries: int = RETRIES, backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S) -> dict[str, str]:
    """Make `dest` a verified copy of `url`; return its digests (always sha256).

    An existing `dest` that verifies is kept without touching the network; one that does not is set
    aside (see the module docstring) and fetched again. A mismatch after downloading raises
    ChecksumMismatch (expected vs got) with the bytes set aside; `dest` itself is never a bad file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            return verify(dest, size, checksum)
        except ChecksumMismatch:
            set_aside(dest)
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, size, checksum is not None, retries, backoff_s, timeout_s)
    try:
        digests = verify(part, size, checksum)
    except ChecksumMismatch as e:
        kept = set_aside(part, dest.name)
        raise ChecksumMismatch(f"{url}: {str(e).split(': ', 1)[1]}; the download is set aside as {kept} "
                               f"(not used): check the URL, mirror or configured checksum") from None
    os.replace(part, dest)
    return digests


def set_aside(path: Path, name: str | None = None) -> Path:
    """Rename a file that failed verification to NAME.<first 16 hex of its sha256>.corrupt."""
    digest = file_digests(path)["sha256"][:16]
    kept = path.with_name(f"{name or path.name}.{digest}.corrupt")
    os.replace(path, kept)
    return kept


def _fetch(url: str, part: Path, size: int | None, has_checksum: bool, retries: int, backoff_s: float,
           timeout_s: float) -> None:
    """Bring `part` to the full length of `url`, resuming and retrying."""
    failures = 0
    have = part.stat().st_size if part.exists() else 0
    bar = progress(size, f"download {part.name[:-5]}", "B", unit_scale=True,
                   unit_divisor=1024, initial=have)
    try:
        while True:
            if size is not None and have > size:
                part.unlink()  # longer than the published size: it cannot be a prefix of this file
                have = 0
                bar.reset(total=size)
            if size is not None and have == size:
                return
            before = have
            try:
                done = _attempt(url, part, have, timeout_s, bar)
                if done or (done is None and size is None and has_checksum):
                    return  # the checksum decides
                if done is None and size is None:
                    raise AjepaError(
                        f"{url}: the server closed the connection after {part.stat().st_size} bytes without "
                        f"announcing the length, and no size or checksum is known for this file, so a cut "
                        f"download cannot be told from a whole one: the bytes are kept in {part} (not used); "
                        f"rerun to resume, or configure its checksum, or pass the file as --source")
                raise _Interrupted("the connection closed before the end of the file")
            except urllib.error.HTTPError as e:
                if e.code not in RETRYABLE_STATUS:
                    raise AjepaError(f"{url}: HTTP {e.code} {e.reason}") from None
                error = f"HTTP {e.code} {e.reason}"
            except (urllib.error.URLError, http.client.HTTPException, OSError, _Interrupted) as e:
                if (full := space_error(part, e)) is not None:
                    raise full from None  # no retry makes room: what arrived stays for a resume
                error = " ".join(str(getattr(e, "reason", e) or type(e).__name__).split())
            have = part.stat().st_size if part.exists() else 0
            failures = 0 if have > before else failures + 1
            if failures > retries:
                kept = f"; the {have} bytes received are kept in {part} and the next run resumes them" if have else ""
                raise AjepaError(f"{url}: download failed after {retries} retries: {error}{kept}")
            bar.write(f"download {part.name[:-5]}: {error}; retrying from byte {have}")
            time.sleep(backoff_s * 2 ** max(failures - 1, 0))
    finally:
        bar.close()


def _attempt(url: str, part: Path, have: int, timeout_s: float, bar) -> bool:
    """One request from byte `have`. True when the file is complete, False when the stream ended early,
    None when it ended without a length to compare with (a close-delimited response)."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # the range starts at or past the end: complete if the server's length is what we hold
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return True
            part.unlink()
            raise _Interrupted(f"HTTP 416 for a resume from byte {have}: starting over") from None
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends the whole file
            bar.reset(total=bar.total)
        elif have:
            start = (response.headers.get("Content-Range") or "").removeprefix("bytes ").partition("-")[0]
            if start != str(have):
                raise _Interrupted(f"resume from byte {have} answered with Content-Range "
                                   f"{response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        # chunked framing marks its own end (a cut one raises IncompleteRead); without it or a length,
        # a connection closed early looks just like the end of the file
        chunked = "chunked" in (response.headers.get("Transfer-Encoding") or "").lower()
        received = 0
        with open(part, "ab" if have else "wb") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (TimeoutError, http.client.IncompleteRead, ConnectionError) as e:
                    raise _Interrupted(f"{type(e).__name__} after {have + received} bytes") from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if expected is not None:
            return received == expected
        return True if chunked else None
