"""One progress bar for every long loop: live on a terminal, a line every 30 s in logs (DVC, SLURM)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0.1 if tty else 30.0,
                dynamic_ncols=tty, **kwargs)
