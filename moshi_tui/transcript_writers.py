"""Transcript files, one small class per format, written while the words arrive.

Every writer is a ``TranscriptListener`` named by its file extension; `WRITERS` holds them by that
name, and `moshi transcribe -f` offers its keys. The line formats (txt, srt, vtt, jsonl) append and
flush each line or cue as soon as it is complete, so a run that stops early, even a killed one,
leaves a valid file with everything recognised so far. A JSON document cannot grow by appending: it is
rewritten whole (a temporary file renamed over it) as words arrive, at most once a second and at
most a tenth of the time, and at the end. Every file is created new (`audio.outputs`): a symlink at
its name is replaced, never written through.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TextIO

from audio.outputs import open_new_text, write_atomically
from engine.stt.words import Segment, TranscriptListener, Word

SCHEMA_VERSION = 1
JSON_REWRITE_S = 1.0
ALL = "all"  # every format at once


def _seconds(t: float) -> float:
    return round(t, 3)


@dataclass(frozen=True)
class CueLimits:
    """SRT and VTT: how much one subtitle line holds."""

    max_line_width: int = 42  # characters; a longer word stands alone
    max_words_per_line: int = 0  # 0: no limit


class TranscriptWriter(TranscriptListener):
    """One transcript format; `extension` names it and its files."""

    extension: ClassVar[str]

    @classmethod
    def open(cls, path: Path | None, stdout: TextIO, info: dict, limits: CueLimits) -> TranscriptWriter:
        """The writer on ``path`` (created now), or on ``stdout`` when ``path`` is None. ``info``: the
        source and the model, for the formats that record them."""
        raise NotImplementedError


class _LineWriter(TranscriptWriter):
    """Writes to a text stream, which it closes at the end if it opened it (a file, not stdout).
    Each format takes from ``info`` and ``limits`` what it needs."""

    def __init__(self, out: TextIO, info: dict, limits: CueLimits = CueLimits(), owned: bool = False):
        self.out = out
        self.info = info
        self.limits = limits
        self.owned = owned

    @classmethod
    def open(cls, path: Path | None, stdout: TextIO, info: dict, limits: CueLimits) -> TranscriptWriter:
        out = stdout if path is None else open_new_text(path)
        return cls(out, info, limits, owned=path is not None)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def on_end(self, complete: bool, duration: float) -> None:
        if self.owned:
            self.out.close()


class TxtWriter(_LineWriter):
    """Plain text, one line per segment; each word goes out as soon as its times are final."""

    extension = "txt"

    def __init__(self, out: TextIO, info: dict, limits: CueLimits = CueLimits(), owned: bool = False):
        super().__init__(out, info, limits, owned)
        self._line_open = False

    def on_word(self, word: Word) -> None:
        self._write((" " if self._line_open else "") + word.text)
        self._line_open = True

    def on_segment(self, segment: Segment) -> None:
        self._write("\n")
        self._line_open = False


class SrtWriter(_LineWriter):
    """SubRip: one line per cue, within the `CueLimits`; a cue never spans two segments."""

    extension = "srt"

    def __init__(self, out: TextIO, info: dict, limits: CueLimits = CueLimits(), owned: bool = False):
        super().__init__(out, info, limits, owned)
        self._words: list[Word] = []
        self._cues = 0

    def on_word(self, word: Word) -> None:
        if self._words and not self._fits(word):
            self._flush_cue()
        self._words.append(word)

    def on_segment(self, segment: Segment) -> None:
        self._flush_cue()

    def on_end(self, complete: bool, duration: float) -> None:
        self._flush_cue()
        super().on_end(complete, duration)

    def _fits(self, word: Word) -> bool:
        if self.limits.max_words_per_line and len(self._words) >= self.limits.max_words_per_line:
            return False
        return len(self._line()) + 1 + len(word.text) <= self.limits.max_line_width

    def _line(self) -> str:
        return " ".join(word.text for word in self._words)

    def _flush_cue(self) -> None:
        if not self._words:
            return
        self._cues += 1
        start, end = self._timestamp(self._words[0].start), self._timestamp(self._words[-1].end)
        self._write(self._cue(self._cues, start, end, self._line()))
        self._words = []

    @staticmethod
    def _cue(index: int, start: str, end: str, text: str) -> str:
        return f"{index}\n{start} --> {end}\n{text}\n\n"

    @staticmethod
    def _timestamp(t: float, separator: str = ",") -> str:
        ms = round(t * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


class VttWriter(SrtWriter):
    """WebVTT: the same cues as SRT, with its header and '.' before the milliseconds."""

    extension = "vtt"

    def __init__(self, out: TextIO, info: dict, limits: CueLimits = CueLimits(), owned: bool = False):
        super().__init__(out, info, limits, owned)
        self._write("WEBVTT\n\n")

    @staticmethod
    def _cue(index: int, start: str, end: str, text: str) -> str:
        return f"{start.replace(',', '.')} --> {end.replace(',', '.')}\n{text}\n\n"


def _word_json(word: Word, segment: int) -> dict:
    return {"text": word.text, "start": _seconds(word.start), "end": _seconds(word.end), "segment": segment}


def _segment_json(segment: Segment, index: int) -> dict:
    return {
        "id": index, "start": _seconds(segment.start), "end": _seconds(segment.end), "text": segment.text,
        "end_reason": segment.end_reason,
        "end_of_turn": None if segment.end_of_turn is None else round(segment.end_of_turn, 4),
    }


class JsonlWriter(_LineWriter):
    """JSON Lines: a "start" line (source, model), then a line per word and per segment, then "end"."""

    extension = "jsonl"

    def __init__(self, out: TextIO, info: dict, limits: CueLimits = CueLimits(), owned: bool = False):
        super().__init__(out, info, limits, owned)
        self._segments = 0
        self._line({"type": "start", "version": SCHEMA_VERSION, **info})

    def _line(self, record: dict) -> None:
        self._write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_word(self, word: Word) -> None:
        self._line({"type": "word", **_word_json(word, self._segments)})

    def on_segment(self, segment: Segment) -> None:
        self._line({"type": "segment", **_segment_json(segment, self._segments)})
        self._segments += 1

    def on_end(self, complete: bool, duration: float) -> None:
        self._line({"type": "end", "complete": complete, "duration": _seconds(duration)})
        super().on_end(complete, duration)


class JsonWriter(TranscriptWriter):
    """One JSON document (schemas/transcript.schema.json), valid on disk at every moment."""

    extension = "json"

    def __init__(self, path: Path | None, info: dict, out: TextIO | None = None):
        """``path``: rewritten as words arrive; else the document goes to ``out`` once, at the end."""
        self.path, self.out = path, out
        self.document = {"version": SCHEMA_VERSION, **info, "complete": False, "duration": None, "text": "",
                         "segments": [], "words": []}
        self._next_save = 0.0
        if path is not None:
            self._save()
            self._next_save = 0.0  # the first word goes to disk at once: the empty document waits for nothing

    @classmethod
    def open(cls, path: Path | None, stdout: TextIO, info: dict, limits: CueLimits) -> TranscriptWriter:
        return cls(path, info, out=stdout)

    def on_word(self, word: Word) -> None:
        self.document["words"].append(_word_json(word, len(self.document["segments"])))
        self._save_if_due()

    def on_segment(self, segment: Segment) -> None:
        self.document["segments"].append(_segment_json(segment, len(self.document["segments"])))
        self._save_if_due()

    def _save_if_due(self) -> None:
        if self.path is not None and time.monotonic() >= self._next_save:
            self._save()

    def on_end(self, complete: bool, duration: float) -> None:
        self.document["complete"] = complete
        self.document["duration"] = _seconds(duration)
        self._save(final=True)

    def _save(self, final: bool = False) -> None:
        started = time.monotonic()
        self.document["text"] = "\n".join(s["text"] for s in self.document["segments"])
        text = json.dumps(self.document, ensure_ascii=False, indent=1) + "\n"
        if self.path is None:
            if final:
                self.out.write(text)
                self.out.flush()
            return
        write_atomically(self.path, text)
        # A long transcript costs more to rewrite: keep that under a tenth of the run.
        now = time.monotonic()
        self._next_save = now + max(JSON_REWRITE_S, 10 * (now - started))


class WordPrinter(TranscriptListener):
    """The words on a terminal as they are recognised, the same words the files get. With a ``name``
    (one of several inputs, whose words arrive interleaved) they are held and printed as one named
    line at the end."""

    def __init__(self, out: TextIO, name: str | None = None):
        self.out = out
        self.name = name
        self._words: list[str] = []

    def on_word(self, word: Word) -> None:
        if self.name is None:
            self.out.write((" " if self._words else "") + word.text)
            self.out.flush()
        self._words.append(word.text)

    def on_end(self, complete: bool, duration: float) -> None:
        self.out.write("\n" if self.name is None else f"{self.name}: {' '.join(self._words)}\n")
        self.out.flush()


class UntimedWarning(TranscriptListener):
    """Says so when the model wrote text but no word could be timed: a model that never writes its
    end-of-padding token marks no word boundary, and every output stays empty."""

    def __init__(self, err: TextIO, name: str):
        self.err = err
        self.name = name
        self.pieces = 0
        self.words = 0

    def on_token(self, token: int, piece: str | None, time: float) -> None:
        self.pieces += piece is not None

    def on_word(self, word: Word) -> None:
        self.words += 1

    def on_end(self, complete: bool, duration: float) -> None:
        if self.pieces and not self.words:
            print(f"moshi: warning: {self.name}: the model wrote {self.pieces} text pieces but never marked where a "
                  "word starts (its end-of-padding token), so no word could be timed and the transcript is empty",
                  file=self.err, flush=True)


WRITERS: dict[str, type[TranscriptWriter]] = {
    writer.extension: writer for writer in (TxtWriter, SrtWriter, VttWriter, JsonWriter, JsonlWriter)
}
CHOICES = (*WRITERS, ALL)  # what `-f` accepts


def writers_for(choice: str) -> list[type[TranscriptWriter]]:
    """The writer classes of one of `CHOICES`."""
    return list(WRITERS.values()) if choice == ALL else [WRITERS[choice]]
