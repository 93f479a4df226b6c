"""Stopping on SIGTERM / SIGINT with a checkpoint (docs/reliability.md, "Preemption").

SLURM and Kubernetes preempt a job with SIGTERM, then SIGKILL after a grace period; Ctrl-C
sends SIGINT. While ``StopSignals`` is active (``train_loop``), the first of these signals only
records itself: the loop finishes the optimiser step in progress, writes a checkpoint
atomically and raises ``Preempted``; the CLI prints one line and exits with
``EXIT_PREEMPTED``. A second signal aborts at once: the default action of that signal is
restored and the signal re-sent, so the process dies of it (exit 143 for SIGTERM, 130 for
SIGINT in a shell), exactly like a kill; the checkpoints are crash-safe either way (the last
complete one stays ``latest``).

Handlers can only be installed from the main thread; elsewhere (a trainer run in a worker
thread) ``StopSignals`` does nothing and the signals keep their usual effect.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Self

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint: EX_TEMPFAIL of
sysexits.h ("temporary failure, retry"), distinct from 0 (done), 1 (environment), 2 (bad
input) and from a death by signal (128 + N), so that a job script can requeue on it and
continue with ``--resume``."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """The run stopped on a signal after writing a checkpoint (the message says which and where).

    A KeyboardInterrupt so that code which cleans up after Ctrl-C, or lets it through, treats it
    the same way, and ``except Exception`` never swallows it (``mhmoe reproduce`` stops too)."""


class StopSignals:
    """Context manager: the first SIGTERM/SIGINT sets ``signal_name``; a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            # The second signal: give up at once, as the signal would without us.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning("%s received: finishing the current step, then saving a checkpoint and exiting "
                       "(send it again to abort at once)", signal.Signals(signum).name)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
