"""Every file under a folder, following links to folders, each folder once however the links loop.

`os.walk(followlinks=True)` enters `audio/loop -> .` again and again: a single loop lists every file
once per level until the path grows too long (each a false duplicate), two loops never finish. Here a
folder already entered (known by its device and inode, whatever the path to it) is not entered again,
so a link to a folder listed elsewhere adds nothing either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["walk_files"]


def walk_files(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk's (folder, sub-folder names, file names), names sorted, for each folder under `root` once.
    File names are every entry that is no folder: a FIFO or a dangling link is listed, for its caller
    to reject."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield folder, dirs, sorted(files)
