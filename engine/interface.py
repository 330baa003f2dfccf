"""The seam between a session and whatever runs the model.

A session (the TUI or ``--no-tui`` pump) drives an ``Engine``: it sends the user's 80 ms frames,
polls for what the model said, and may start a new conversation or show a new picture. The
engine process on this machine (``engine.process.EngineProcess``) is one implementation; any
other (a remote server over a websocket, a scripted one in tests) needs only this file.

Torch-free: the app's process imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


# -- what `Engine.poll` returns -----------------------------------------------------------------


@dataclass(frozen=True)
class Loading:
    detail: str  # progress, e.g. "loading Mimi"


@dataclass(frozen=True)
class WarmingUp:
    pass


# The key of `Ready.info` that names the model recognising the user's words, or says "off".
USER_WORDS = "user words"


@dataclass(frozen=True)
class Ready:
    info: dict[str, str]  # the runner's describe(): model, device, dtype, USER_WORDS, ...


@dataclass(frozen=True)
class Described:
    info: dict[str, str]  # `Ready.info` with what was learned since (a server's metadata naming its model)


@dataclass(frozen=True)
class Output:
    index: int  # the frame it answers, counted from 0 since start or the last reset
    pcm: np.ndarray | None  # the model's voice for that frame (FRAME_SIZE samples), None when silent or listening
    text: str | None  # the text piece of that frame, None for padding
    timings_ms: dict[str, float]  # the runner's own, plus "roundtrip": send to receive
    gate: float | None = None  # MoshiVis: how much it looked at the picture this step
    user_text: str | None = None  # the user's words of that frame, from a speech recogniser beside the model
    late: int = 0  # text and user_text belong to frame `index - late` (an engine that answers in a pipeline)


@dataclass(frozen=True)
class Failed:
    reason: str  # one line for the user
    detail: str = ""  # a traceback, for MOSHI_DEBUG


EngineEvent = Loading | WarmingUp | Ready | Described | Output | Failed


@runtime_checkable
class Engine(Protocol):
    """What a session needs from an engine. No method may block for long: the session's pump
    calls them between audio frames.

    The life cycle is told by `poll`: any number of `Loading`, one `WarmingUp`, one `Ready`,
    then an `Output` for every frame `send_frame` accepted, in order, and a `Described` whenever
    more is known about the model; a `Failed` ends it.
    """

    max_in_flight: int  # frames sent but not answered that the engine accepts before refusing more
    skipped: int  # frames refused so far because the engine was behind (never reset)

    @property
    def in_flight(self) -> int:
        """Frames sent and not answered yet."""

    def send_frame(self, pcm: np.ndarray) -> bool:
        """Queue one frame of the user's voice (FRAME_SIZE float32 samples); False when refused:
        the engine is not live yet, or `max_in_flight` frames behind (then counted in `skipped`)."""

    def poll(self, timeout: float = 0.0) -> list[EngineEvent]:
        """What the engine said since the last poll, waiting up to `timeout` s for the first event."""

    def reset(self) -> None:
        """A new conversation with the same model: answers to earlier frames are dropped and
        `Output.index` starts again at 0."""

    def set_image(self, data: bytes, name: str) -> None:
        """MoshiVis: talk about this picture (a file's bytes) from now on, in a new conversation."""

    def close(self) -> None:
        """End the engine; idempotent. Nothing may be left running."""
