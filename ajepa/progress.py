"""One progress bar for every long loop: live on a terminal, a line every 30 s in logs (DVC, SLURM)."""

from __future__ import annotations

import sys
import weakref

from tqdm import tqdm

_bars: weakref.WeakSet = weakref.WeakSet()


def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0.1 if tty else 30.0,
               dynamic_ncols=tty, **kwargs)
    _bars.add(bar)
    return bar


def close_bars() -> None:
    """Close the bars an error left open on its way up, so that its message starts a line of its own
    instead of trailing the last drawn bar."""
    for bar in list(_bars):
        bar.close()
