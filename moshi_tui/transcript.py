"""The conversation as paragraphs: what the transcript panel shows and what `s` and the session
recorder write. A paragraph ends when the other side speaks or its speaker pauses."""

from __future__ import annotations

from dataclasses import dataclass

USER = "you"


def clock(t: float) -> str:
    """Conversation time as mm:ss (h:mm:ss past an hour)."""
    s = int(t)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60:02d}:{s % 60:02d}"


@dataclass
class Paragraph:
    t: float
    speaker: str | None  # None in transcribe mode, where every word is the user's
    text: str = ""

    def line(self) -> str:
        if self.speaker == USER and not self.text:
            return f"[{clock(self.t)}] ({USER} spoke)"  # no speech recogniser: only that the user spoke
        label = f" {self.speaker}:" if self.speaker else ""
        return f"[{clock(self.t)}]{label} {self.text}"


@dataclass(frozen=True)
class Change:
    """What one `Transcript.add_text` or `mark_user` did, so that each view draws just that."""

    paragraph: Paragraph  # the paragraph begun, or the last one, grown
    text: str  # what to draw: the whole of a new paragraph, else the piece appended
    new: bool
    index: int  # the paragraph's place in the transcript: 0 is the first (no line break before it)


class Transcript:
    def __init__(self, speaker: str | None, pause_s: float = 2.0) -> None:
        self.speaker = speaker
        self.pause_s = pause_s
        self.paragraphs: list[Paragraph] = []
        self._last_t = float("-inf")
        self._break = False

    def add_text(self, t: float, text: str) -> Change | None:
        """Append a piece of the model's text; None when that changed nothing (an empty piece, or
        only spaces where a paragraph would begin)."""
        return self._add(t, text, self.speaker)

    def add_user_text(self, t: float, text: str) -> Change | None:
        """Append a piece of the user's words, recognised beside a conversation."""
        return self._add(t, text, USER)

    def _add(self, t: float, text: str, speaker: str | None) -> Change | None:
        current = self.paragraphs[-1] if self.paragraphs else None
        if (current is None or current.speaker != speaker or not current.text or self._break
                or t - self._last_t > self.pause_s):
            text = text.lstrip()
            if not text:
                return None
            self._last_t = t
            self._break = False
            return self._begin(Paragraph(t, speaker, text))
        self._last_t = t
        if not text:
            return None
        current.text += text
        return Change(current, text, new=False, index=len(self.paragraphs) - 1)

    def mark_user(self, t: float) -> Change | None:
        """Chat: a marker paragraph (None if one is already the last). Transcribe: the user's next
        words start a new paragraph, and nothing changes yet."""
        if self.speaker is None:
            self._break = True
            return None
        if self.paragraphs and self.paragraphs[-1].speaker == USER:
            return None
        return self._begin(Paragraph(t, USER))

    def _begin(self, paragraph: Paragraph) -> Change:
        self.paragraphs.append(paragraph)
        return Change(paragraph, paragraph.text, new=True, index=len(self.paragraphs) - 1)

    def to_text(self) -> str:
        return "".join(p.line() + "\n" for p in self.paragraphs)
