"""Where a dataset's parts come from: the registry URL (or a mirror), a local archive, or a directory.

`obtain` makes every part of a dataset available and says where each one is:

- no source: each file is downloaded into the shared downloads folder (resumable, verified) and
  extracted into the dataset's (temporary) raw folder;
- `source` is an archive: the dataset's only archive part (verified when a checksum is known);
- `source` is a directory: for each part, first its archive(s) under the registry's file name (or a
  common alias, or for pieces the joined file), verified and extracted; otherwise an extracted
  copy, found by the part's marker at the directory or up to two levels below it, used in place
  (nothing is copied or written into the user's directory).

Each file used is described by a record (name, origin, bytes, sha256, and which published checksum
was checked) for the manifest sidecar; a directory used in place is described by a fingerprint of
its listing (relative paths and sizes), which is cheap even for millions of files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ajepa.datasets.archive import BrokenArchive, extract
from ajepa.datasets.download import Checksum, ChecksumMismatch, download, set_aside, verify
from ajepa.datasets.registry import DatasetInfo, Part, RemoteFile
from ajepa.errors import AjepaError

MARKER_DEPTH = 2  # an extracted copy may sit one or two folders down (ESC-50-master/, a wrapper folder)


@dataclass
class Located:
    """Where each part is (an extracted tree, or a plain file) and what was used to get there."""

    roots: dict[str, Path] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    in_place: dict[str, Path] = field(default_factory=dict)  # parts used from the user's directory


def expected_checksum(file: RemoteFile, overrides: dict[str, str]) -> Checksum | None:
    if file.name in overrides:
        return Checksum.parse(overrides[file.name])
    published = file.checksum
    return Checksum(*published) if published else None


def expected_size(file: RemoteFile, overrides: dict[str, str]) -> int | None:
    """The published size, unless a configured checksum says the file is another one."""
    return None if file.name in overrides else file.size


def file_url(file: RemoteFile, mirror: str | None) -> str:
    """The file's URL; a mirror serves every file of the registry under its own name."""
    return f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url


def obtain(info: DatasetInfo, workdir: Path, downloads: Path, source: str | None = None, mirror: str | None = None,
           checksums: dict[str, str] | None = None) -> Located:
    """Make every part of `info` available; archives are extracted under `workdir` (part.subdir)."""
    checksums = checksums or {}
    located = Located()
    if source is None:
        for part in info.parts:
            _download_part(info, part, workdir, downloads, mirror, checksums, located)
        return located

    src = Path(source)
    if not src.exists():
        raise AjepaError(f"source {source}: no such file or directory")
    if src.is_file():
        if len(info.file_names) != 1:
            raise AjepaError(f"source {source}: {info.name} is distributed as several files "
                             f"({', '.join(info.file_names)}); give a directory holding them (or their extracted copies)")
        (part,), f = info.parts, info.parts[0].files[0]
        located.records.append(_check_local(info.name, f, src, checksums))
        _install(info, part, [src], workdir, located)
        return located

    # find every part before verifying or extracting anything: a missing one fails in seconds
    plan = []
    for part in info.parts:
        files = _archives_in(part, src)
        root = None if files is not None else find_marker(src, part.marker)
        if files is None and root is None:
            wanted = part.files[0].name if len(part.files) == 1 else \
                f"the pieces {', '.join(f.name for f in part.files)}" + \
                (f" (or {part.joined_name})" if part.joined_name else "")
            what = "a copy" if part.kind == "file" else f"an extracted copy (a folder with {part.marker})"
            raise AjepaError(f"source {source}: {info.name} part {part.name!r} not found: no {wanted} and no "
                             f"{what} in it or up to {MARKER_DEPTH} levels below")
        plan.append((part, files, root))
    for part, files, root in plan:
        if files is not None:
            for f, path in files:
                located.records.append(_check_local(info.name, f, path, checksums))
            _install(info, part, [p for _, p in files], workdir, located)
        elif part.kind == "file":
            f = part.files[0]
            located.records.append(_check_local(info.name, f, root / part.marker, checksums))
            _install(info, part, [root / part.marker], workdir, located)
        else:
            located.roots[part.name] = root
            located.in_place[part.name] = root
    return located


def _download_part(info: DatasetInfo, part: Part, workdir: Path, downloads: Path, mirror: str | None,
                   checksums: dict[str, str], located: Located) -> None:
    files = []
    for f in part.files:
        dest = downloads / f.name
        digests = download(file_url(f, mirror), dest, expected_size(f, checksums),
                           expected_checksum(f, checksums))
        located.records.append(_record(f, file_url(f, mirror), dest, digests, expected_checksum(f, checksums)))
        files.append(dest)
    try:
        _install(info, part, files, workdir, located)
    except BrokenArchive as e:
        unverified = [d for f, d in zip(part.files, files)
                      if expected_checksum(f, checksums) is None and expected_size(f, checksums) is None]
        raise BrokenArchive(_set_aside_broken(e, unverified)) from None


def _set_aside_broken(error: BrokenArchive, downloads: list[Path]) -> str:
    """Move downloads that nothing verified and that do not open out of their final names (a cut
    download that a server could not be caught sending short), so the next run fetches them again."""
    if not downloads:
        return str(error)
    kept = ", ".join(str(set_aside(d)) for d in downloads)
    return f"{str(error).rsplit(': ', 1)[0]}; set aside as {kept} (not used): rerun to download it again"


def _archives_in(part: Part, directory: Path) -> list[tuple[RemoteFile | None, Path]] | None:
    """The part's archive file(s) in `directory` (by name or alias), or None when not all are there."""
    if part.kind != "archive":
        return None
    found = []
    for f in part.files:
        path = next((directory / n for n in (f.name, *f.aliases) if (directory / n).is_file()), None)
        if path is None:
            break
        found.append((f, path))
    else:
        return found
    if part.joined_name and (directory / part.joined_name).is_file():
        return [(None, directory / part.joined_name)]  # no checksum is published for the joined file
    return None


def find_marker(directory: Path, marker: str, depth: int = MARKER_DEPTH) -> Path | None:
    """The shallowest folder at or below `directory` containing `marker` (breadth first, sorted)."""
    level = [directory]
    for _ in range(depth + 1):
        for d in level:
            if (d / marker).exists():
                return d
        level = sorted(c for d in level for c in _subdirs(d))
    return None


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _install(info: DatasetInfo, part: Part, files: list[Path], workdir: Path, located: Located) -> None:
    target = workdir / part.subdir
    if part.kind == "file":
        target.mkdir(parents=True, exist_ok=True)
        dest = target / part.marker
        shutil.copyfile(files[0], dest)
        located.roots[part.name] = dest
        return
    extract(files, target, label=files[0].name if len(files) == 1 else f"{info.name} {part.name} pieces")
    root = find_marker(target, part.marker)
    if root is None:
        raise AjepaError(f"{files[0]}: extracted, but no {part.marker} in it: not the {info.name} {part.name!r} "
                         f"archive?")
    located.roots[part.name] = root


def _check_local(dataset: str, file: RemoteFile | None, path: Path, checksums: dict[str, str]) -> dict:
    """Verify a user's file against the published (or configured) size and checksum; a file without
    a registry entry (the joined pieces) is only hashed."""
    checksum = expected_checksum(file, checksums) if file else None
    try:
        digests = verify(path, expected_size(file, checksums) if file else None, checksum)
    except ChecksumMismatch as e:
        key = f"datasets.{dataset}.prepare.checksums"
        fix = (f"correct or remove its entry in {key}" if file.name in checksums else
               f"to use this copy anyway (a re-packed archive, say), set {key} to "
               f"{{{file.name}: 'sha256:<its sha256sum>'}} in params.yaml")
        raise ChecksumMismatch(f"{e} (the file is left as it is): not the file the checksum describes; {fix}, "
                               f"or pass the extracted folder to --source (used in place, not verified)") from None
    return _record(file, str(path), path, digests, checksum)


def _record(file: RemoteFile | None, origin: str, path: Path, digests: dict[str, str], checksum: Checksum | None) -> dict:
    return {"name": file.name if file else path.name, "origin": origin, "bytes": path.stat().st_size,
            "sha256": digests["sha256"], "verified": str(checksum) if checksum else None}


def listing_fingerprint(root: Path, paths) -> dict:
    """sha256 over the sorted (path relative to `root`, size) list of the files a manifest uses from a
    directory in place: two copies with the same files in other places get the same fingerprint."""
    h = hashlib.sha256()
    total = 0
    relative = sorted(os.path.relpath(p, root) for p in paths)
    for rel in relative:
        size = os.stat(os.path.join(root, rel)).st_size
        total += size
        h.update(f"{rel}\t{size}\n".encode())
    return {"path": str(root), "files": len(relative), "bytes": total, "listing_sha256": h.hexdigest()}
