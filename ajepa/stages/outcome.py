"""A benchmark stage that fails leaves a metrics file saying so, so that `ajepa report` can still be written
with that benchmark's row marked failed and the other benchmarks' rows intact (docs/pipeline.md, "When a
benchmark fails"). The stage still exits non-zero: DVC and Snakemake record it as failed and run it again.

    {"benchmark": "esc50", "stage": "linear", "failed": "one line: why"}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ajepa.atomic import write_json
from ajepa.errors import AjepaError

__all__ = ["FAILED", "recorded_failure"]

FAILED = "failed"  # the key a failure record carries (and a results file never does)


@contextlib.contextmanager
def recorded_failure(path: Path, benchmark: str, stage: str) -> Iterator[None]:
    """Run the block; if it raises (an error, or a stop by a signal such as a job's time limit), write the
    failure record at `path` and let the exception go on."""
    try:
        yield
    except BaseException as e:
        why = str(e) if isinstance(e, AjepaError) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError, AjepaError):  # a full disk must not hide the error itself
            write_json(path, {"benchmark": benchmark, "stage": stage, FAILED: " ".join(why.split())[:500]})
        raise
