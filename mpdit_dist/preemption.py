"""A process-wide "stop soon" flag, set by signal handlers (SLURM's warning signal) or by code.

The trainer polls ``stop_requested()`` once per step (cheap: a list that is empty or not); when set it
saves a checkpoint at the next step boundary on every rank and returns with status "preempted".
What happens next (requeue or exit) is the launcher's decision, not the trainer's.
"""
from __future__ import annotations

import signal

# The stop requests so far (their reasons), oldest first; non-empty means "stop soon". A plain
# list on purpose: ``list.append`` takes no lock. A ``threading.Event`` would: its ``set()`` holds
# a non-reentrant lock, and a second signal (SLURM's SIGTERM right after the warning signal) whose
# handler runs while the first handler, or a ``request_stop`` call, is inside ``set()`` would wait
# for that lock forever, in the main thread: the process hung and ignored every later SIGTERM.
_REASONS: list[str] = []


def request_stop(reason: str = "requested") -> None:
    """Ask the run to stop at the next step boundary; safe in a signal handler, nested or not."""
    _REASONS.append(reason)


def stop_requested() -> bool:
    return bool(_REASONS)


def stop_reasons() -> list[str]:
    """Every reason asked so far, each once, in the order first asked."""
    return list(dict.fromkeys(_REASONS))


def stop_reason() -> str | None:
    return _REASONS[-1] if _REASONS else None


def clear() -> None:
    _REASONS.clear()


def install_signal_handlers(signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
    """Turn the given signals into a stop request (main thread only)."""

    def handler(signum, _frame):
        request_stop(signal.Signals(signum).name)

    for sig in signals:
        signal.signal(sig, handler)
