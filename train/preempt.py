"""Preemption: Slurm sends SIGUSR1 (--signal=USR1@120) before the time limit and SIGTERM on
preemption or scancel. The handler only raises a flag; the loop finishes its step, agrees with
the other ranks (loop.Clock), saves, and the CLI exits with EXIT_REQUEUE."""
from __future__ import annotations

import signal
from typing import Any

EXIT_REQUEUE = 75        # EX_TEMPFAIL: "stopped on a signal, checkpoint saved, run me again"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: Slurm (and `kill -- -PGID`) signal every process of the
    job, workers included; torch's workers die on SIGTERM and take the trainer down with a
    traceback before it can save. The main process owns the stop; its workers ignore it
    (they exit with the main process, which torch's worker watchdog notices).
    Also called by the CLI once a stopped run has saved, right before it exits 75."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
