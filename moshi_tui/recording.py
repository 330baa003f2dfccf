"""The files of one conversation, written while it runs so that a crash loses at most a second.

In its own folder (``<data dir>/sessions/<time>-<mode>/`` or ``--record DIR/<time>-<mode>/``):

- ``audio.wav``: chat and see: stereo, the user left and Moshi right; transcribe: the user. From
  a file, written here frame-aligned as the model heard and answered; from the microphone, the
  audio layer records it in real time (what was heard after echo cancellation, and what played).
  Valid at every moment (the audio layer's writer).
- ``transcript.txt``: the paragraphs, appended piece by piece and flushed.
- ``transcript.json``: every text piece with its conversation time (the user's, recognised beside
  a chat, with ``"speaker": "you"``), and the paragraphs; replaced atomically at most once a
  second, so it is always complete JSON.
- ``events.jsonl``: one JSON object per line (start, states, speech, the user's words, mute,
  stats, errors, end).

A conversation is private: its folder is readable by its owner only (700), and so are its files
(600).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from audio import SAMPLE_RATE
from audio.outputs import open_new_text, write_atomically
from audio.wav import WavWriter
from engine.options import Mode

from engine.interface import USER_WORDS

from .transcript import USER, Change, Transcript
from .transcript_writers import write_atomically

JSON_EVERY_S = 1.0
PRIVATE = 0o600  # the session files' permissions


def new_session_folder(base: Path, mode: Mode) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = base / f"{stamp}-{mode.value}"
    n = 2
    while folder.exists():  # a restart within the same second
        folder = base / f"{stamp}-{mode.value}-{n}"
        n += 1
    folder.mkdir(mode=0o700, parents=True)
    return folder


class Recorder(Protocol):
    """What a session writes as it goes; `SessionRecorder` keeps it, `NoRecorder` does not."""

    def frame(self, user: np.ndarray, moshi: np.ndarray | None = None) -> None: ...
    def text(self, t: float, piece: str) -> None: ...
    def user_text(self, t: float, piece: str) -> None: ...
    def user_speech(self, t: float, speaking: bool) -> None: ...
    def event(self, kind: str, **fields: Any) -> None: ...
    def close(self) -> None: ...


def recognises_user_words(info: dict[str, Any]) -> bool:
    """The engine recognises the user's words: they make the user's paragraphs, not "(you spoke)"."""
    return info.get(USER_WORDS, "off") != "off"


class SessionRecorder:
    def __init__(self, folder: Path, mode: Mode, info: dict[str, Any], wav: bool = True) -> None:
        """`wav=False`: the audio layer records the WAV itself (live audio, in real time)."""
        self.folder = folder
        self.mode = mode
        self.started = datetime.now().astimezone().isoformat(timespec="seconds")
        self.info = info
        self.user_words = recognises_user_words(info)
        self.transcript = Transcript("moshi" if mode.talks else None)
        self.pieces: list[dict[str, Any]] = []
        channels = 2 if mode.talks else 1
        self.wav = WavWriter(folder / "audio.wav", SAMPLE_RATE, channels, mode=PRIVATE) if wav else None
        self._txt = open_new_text(folder / "transcript.txt", PRIVATE)
        self._events = open_new_text(folder / "events.jsonl", PRIVATE)
        self._json_dirty = True
        self._json_at = 0.0
        self.event("start", mode=mode.value, **info)
        self._write_json()

    def frame(self, user: np.ndarray, moshi: np.ndarray | None = None) -> None:
        """One 80 ms frame: what the model heard and (when Moshi talks) what it said."""
        if self.wav is None:
            return
        if self.mode.talks:
            self.wav.write(user, np.zeros_like(user) if moshi is None else moshi)
        else:
            self.wav.write(user)

    def text(self, t: float, piece: str) -> None:
        self.pieces.append({"t": round(t, 3), "text": piece})
        self._write_change(self.transcript.add_text(t, piece))
        self._json_dirty = True
        self._maybe_write_json()

    def user_text(self, t: float, piece: str) -> None:
        self.pieces.append({"t": round(t, 3), "text": piece, "speaker": USER})
        self.event("user words", t=round(t, 3), text=piece)
        self._write_change(self.transcript.add_user_text(t, piece))
        self._json_dirty = True

    def user_speech(self, t: float, speaking: bool) -> None:
        self.event("speech", t=t, speaking=speaking)
        if speaking and not self.user_words:
            self._write_change(self.transcript.mark_user(t))

    def event(self, kind: str, **fields: Any) -> None:
        record = {"time": datetime.now().astimezone().isoformat(timespec="milliseconds"), "event": kind, **fields}
        self._events.write(json.dumps(record, default=_plain) + "\n")
        self._events.flush()
        self._maybe_write_json()

    def close(self) -> None:
        if self._events.closed:
            return
        self.event("end")
        if self.wav is not None:
            self.wav.close()
        if self.transcript.paragraphs:
            self._txt.write("\n")
        self._txt.close()
        self._events.close()
        self._write_json()

    def _write_change(self, change: Change | None) -> None:
        """transcript.txt: a line per paragraph, each piece appended as it comes."""
        if change is None:
            return
        if change.new:
            self._txt.write(("\n" if change.index else "") + change.paragraph.line())
        else:
            self._txt.write(change.text)
        self._txt.flush()

    def _maybe_write_json(self) -> None:
        if self._json_dirty and time.monotonic() - self._json_at >= JSON_EVERY_S:
            self._write_json()

    def _write_json(self) -> None:
        doc = {
            "mode": self.mode.value,
            "started": self.started,
            **self.info,
            "pieces": self.pieces,
            "paragraphs": [{"t": round(p.t, 3), "speaker": p.speaker, "text": p.text}
                           for p in self.transcript.paragraphs],
        }
        write_atomically(self.folder / "transcript.json", json.dumps(doc, ensure_ascii=False, indent=1), PRIVATE)
        self._json_dirty = False
        self._json_at = time.monotonic()


def _plain(value: Any) -> Any:
    """numpy scalars and paths in event fields."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class NoRecorder:
    """`--no-record`: a `SessionRecorder` that keeps nothing."""

    def frame(self, user: np.ndarray, moshi: np.ndarray | None = None) -> None:
        pass

    def text(self, t: float, piece: str) -> None:
        pass

    def user_text(self, t: float, piece: str) -> None:
        pass

    def user_speech(self, t: float, speaking: bool) -> None:
        pass

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass
