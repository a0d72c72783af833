"""A process-wide "stop soon" flag, set by signal handlers (SLURM's warning signal) or by code.

The trainer polls ``stop_requested()`` once per step (cheap: a threading.Event); when set it
saves a checkpoint at the next step boundary on every rank and returns with status "preempted".
What happens next (requeue or exit) is the launcher's decision, not the trainer's.
"""
from __future__ import annotations

import signal
import threading

_STOP = threading.Event()
_REASON: list[str] = []


def request_stop(reason: str = "requested") -> None:
    _REASON.append(reason)
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def stop_reason() -> str | None:
    return _REASON[-1] if _REASON else None


def clear() -> None:
    _STOP.clear()
    _REASON.clear()


def install_signal_handlers(signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
    """Turn the given signals into a stop request (main thread only)."""

    def handler(signum, _frame):
        request_stop(signal.Signals(signum).name)

    for sig in signals:
        signal.signal(sig, handler)
