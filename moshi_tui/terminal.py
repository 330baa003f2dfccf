"""The terminal while a session runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def native_noise_into(log: Path | None) -> Iterator[None]:
    """What C libraries write to file descriptor 2 (ALSA's "underrun occurred", PortAudio, decoders)
    would land in the middle of the app's drawing, or of a headless run's lines: it goes to ``log``
    (appended; nowhere when None). The app draws on a copy of the terminal's descriptor, which
    Textual takes from ``sys.__stderr__``, and Python's own messages stay on the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    target = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(target, 2)
    os.close(target)
    saved = sys.__stderr__, sys.stderr
    screen = os.fdopen(terminal, "w", buffering=1, encoding=sys.__stderr__.encoding, errors="backslashreplace")
    sys.__stderr__ = screen
    if _on_fd2(sys.stderr):  # else Python's messages already go elsewhere (a capture, say): left there
        sys.stderr = screen
    try:
        yield
    finally:
        screen.flush()
        os.dup2(terminal, 2)
        sys.__stderr__, sys.stderr = saved
        screen.close()


def _on_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
