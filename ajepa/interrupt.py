"""SIGINT and SIGTERM as a clean stop instead of a sudden death.

Python turns SIGINT into KeyboardInterrupt but dies on SIGTERM without running a single `finally`,
and SIGTERM is what a scheduler sends before its kill (SLURM: KillWait seconds before the SIGKILL), as
do `kill`, `docker stop` and `systemctl stop`. Inside `StopSignals()` both signals raise `Interrupted`
at once: every output is written to a temporary name and renamed into place, so stopping anywhere
leaves the old output or the new one, and the temporaries are removed on the way out. A training loop
that can save at a step boundary uses `StopSignals(deferred=True)`: the first signal only records
itself, the loop polls `requested()` after each step, saves and stops; a second signal stops at once.
"""

from __future__ import annotations

import signal
import threading

from ajepa.errors import Interrupted

__all__ = ["StopSignals", "signal_name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Handlers for SIGINT and SIGTERM for the duration of a `with` block (the previous ones restored
    after it). Only the main thread can install handlers; elsewhere the block changes nothing."""

    def __init__(self, deferred: bool = False):
        self.deferred = deferred
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> int | None:
        """The signal received so far (deferred mode), or None."""
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if self.deferred and self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum, f"stopped by {signal_name(signum)}")

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
