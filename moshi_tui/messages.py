"""What a running conversation tells the TUI.

Plain dataclasses, no Textual: the live session, the scripted engine of the tests and the
``--no-tui`` printer all produce or consume them. Times ``t`` are conversation time in seconds
(frame index × 80 ms), so a scripted run renders the same on every machine.

Whoever receives them has a handler per kind, named as Textual names its message handlers
(``on_text_piece`` for a `TextPiece`): the app through Textual itself, the others through
`dispatch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from audio.core import AudioStats
from engine.options import Mode


@dataclass(frozen=True)
class SessionInfo:
    mode: Mode
    model: str
    device: str
    dtype: str
    server: str = ""  # where the model runs when it is not here (--url), as shown to the user


@dataclass(frozen=True)
class StateChanged:
    """The engine's life cycle. "lagging" is not sent: the app derives it from `Stats`."""

    state: str  # "loading", "warming up", "live", "ended"
    detail: str = ""  # loading progress, e.g. "reading model.safetensors"


@dataclass(frozen=True)
class TextPiece:
    t: float
    text: str  # a piece of a word as the model produced it, spaces included
    gate: float | None = None  # `moshi see`: how much Moshi looked at the picture as it said it


@dataclass(frozen=True)
class UserWords:
    """A piece of the user's words, recognised beside the conversation (`--user-stt`)."""

    t: float
    text: str  # spaces included, as the recogniser wrote it


@dataclass(frozen=True)
class UserSpeech:
    """The user started or stopped speaking (voice activity from the mic level)."""

    t: float
    speaking: bool


@dataclass(frozen=True)
class Stats:
    """Measurements after one frame: the model's step and the audio layer's own record. The session
    sends one per frame; the app keeps the latest figures and every step time (for the sparkline)."""

    t: float
    audio: AudioStats = field(default_factory=AudioStats)
    step_ms: float | None = None  # model step time of this frame (the 80 ms budget)
    skipped: int = 0  # frames dropped so far: the model fell behind, or the audio layer found them stale
    roundtrip_ms: float | None = None  # from sending the frame to its answer: the step, plus the network's for a server


@dataclass(frozen=True)
class SessionFailed:
    """The engine died or stalled, or the audio device went away: the session is over."""

    reason: str  # one line, e.g. "the engine process was killed by SIGKILL"


Event = Union[SessionInfo, StateChanged, TextPiece, UserWords, UserSpeech, Stats, SessionFailed]


def dispatch(target: object, event: object) -> None:
    """Call `target`'s handler for the kind of `event`: ``on_`` and its class name in snake case
    (``TextPiece`` → ``on_text_piece``). As with Textual's messages, a target without a handler
    for a kind does not care about it."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
    handler = getattr(target, f"on_{name}", None)
    if handler is not None:
        handler(event)
