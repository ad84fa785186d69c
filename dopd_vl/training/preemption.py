"""Stopping on a scheduler's signal without losing the run (docs/design.md §4.6).

SLURM, Kubernetes and spot instances send SIGTERM and give a grace period; a user presses Ctrl-C
(SIGINT). Inside `StopSignals` the first such signal only sets a flag: the trainer finishes the
optimizer step it is in, every process agrees to stop at that step, a checkpoint is written and the
run exits with `PREEMPTED_EXIT_CODE`, after which `dopd train --resume` continues exactly. A second
signal restores the default action and re-sends itself, so the process ends at once; that is safe
because checkpoints are only ever renamed into place when complete. A repeat within
`SAME_SIGNAL_WINDOW_S` of the first counts as the same request: a scheduler signals every process
of a job and a launcher (torchrun) forwards the signal it got to its workers, so a worker often
receives one preemption twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from dopd_vl.errors import PREEMPTED_EXIT_CODE

__all__ = ["SAME_SIGNAL_WINDOW_S", "StopSignals"]

logger = logging.getLogger(__name__)

SAME_SIGNAL_WINDOW_S = 2.0


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGINT set `received` instead of ending the process.

    Only the main thread can install handlers; elsewhere (a notebook's worker thread) this does
    nothing and signals keep their default effect."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self._first_at < SAME_SIGNAL_WINDOW_S:
                return  # the same preemption, forwarded by a launcher
            signal.signal(signum, signal.SIG_DFL)  # a second request: the default action, now
            os.kill(os.getpid(), signum)
            return
        self.received, self._first_at = signum, time.monotonic()
        logger.warning(
            "received %s: finishing this optimizer step, then a checkpoint and exit %d (send it again to stop at once)",
            signal.Signals(signum).name,
            PREEMPTED_EXIT_CODE,
        )
