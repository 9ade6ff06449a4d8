"""SIGINT and SIGTERM as a clean stop instead of a sudden death.

Python turns SIGINT into KeyboardInterrupt but dies on SIGTERM without running a single `finally`,
and SIGTERM is what a scheduler sends before its kill (SLURM: KillWait seconds before the SIGKILL), as
do `kill`, `docker stop` and `systemctl stop`. Inside `StopSignals()` both signals raise `Interrupted`
at once: every output is written to a temporary name and renamed into place, so stopping anywhere
leaves the old output or the new one, and the temporaries are removed on the way out. A training loop
that can save at a step boundary uses `StopSignals(deferred=True)`: the first signal only records
itself, the loop polls `requested()` after each step, saves and stops; a second signal stops at once (the
same signal within RELAYED_S of the first counts as the first: a launcher relaying it).
A raise that lands where Python ignores exceptions (a fork callback of a process pool, a __del__)
is not lost: the signal is sent again a moment later. Forked workers that inherit the handlers keep
their old behaviour (a pool's terminate() sends them SIGTERM; they end quietly, as before).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ajepa.errors import Interrupted

__all__ = ["StopSignals", "signal_name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A signal repeated this soon after the first is the same request: slurmstepd signals every process of
# the step, and torch's launcher, signalled too, passes the signal on to the processes it started.
RELAYED_S = 2.0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Handlers for SIGINT and SIGTERM for the duration of a `with` block (the previous ones restored
    after it). Only the main thread can install handlers; elsewhere the block changes nothing."""

    def __init__(self, deferred: bool = False):
        self.deferred = deferred
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}
        self._previous_hook = None
        self._pid = os.getpid()

    def requested(self) -> int | None:
        """The signal received so far (deferred mode), or None."""
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a forked worker (a process pool, a DataLoader) inherits the handler: it behaves as it did
            # before, and its parent decides (pool.terminate() sends SIGTERM to every worker)
            self._pass_on(signum, frame)
            return
        if self.deferred and self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            return
        if self.deferred and signum == self.signum and time.monotonic() - self._first < RELAYED_S:
            return  # the same stop again: a launcher relays to its processes the signal the group already got
        raise Interrupted(signum, f"stopped by {signal_name(signum)}")

    def _pass_on(self, signum: int, frame) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _unraisable(self, info) -> None:
        if isinstance(info.exc_value, Interrupted) and os.getpid() == self._pid:
            # the raise landed where Python ignores exceptions (a fork callback, a __del__): send the
            # signal again a moment later, when the main thread is most likely back in plain code
            threading.Timer(0.05, os.kill, (self._pid, info.exc_value.signum)).start()
            return
        self._previous_hook(info)

    def install(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._previous_hook is not None:
            sys.unraisablehook, self._previous_hook = self._previous_hook, None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
