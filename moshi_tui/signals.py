"""Ending a run on a signal: Ctrl-C (SIGINT), SIGTERM and SIGHUP end it as the q key does (the
terminal restored, the session files closed), then the process exits 128 + the signal's number:
130, 143 and 129."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal; `code` is the process's exit status."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """130 for a plain KeyboardInterrupt (Ctrl-C), else the signal's status."""
    return exc.code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def raising() -> Iterator[None]:
    """Within: each of `ENDING` raises `Interrupted` in the main thread."""
    previous = {signum: signal.signal(signum, _raise) for signum in ENDING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
