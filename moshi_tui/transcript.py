"""The conversation as paragraphs: what the transcript panel shows and what `s` and the session
recorder write. A paragraph ends when the user speaks or the model pauses."""

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
        if self.speaker == USER:
            return f"[{clock(self.t)}] ({USER} spoke)"
        label = f" {self.speaker}:" if self.speaker else ""
        return f"[{clock(self.t)}]{label} {self.text}"


class Transcript:
    def __init__(self, speaker: str | None, pause_s: float = 2.0) -> None:
        self.speaker = speaker
        self.pause_s = pause_s
        self.paragraphs: list[Paragraph] = []
        self._last_t = float("-inf")
        self._break = False

    def add_text(self, t: float, text: str) -> bool:
        """Append a piece of text; True when it began a new paragraph."""
        current = self.paragraphs[-1] if self.paragraphs else None
        new = current is None or current.speaker == USER or self._break or t - self._last_t > self.pause_s
        if new:
            text = text.lstrip()
            if not text:
                return False
            self.paragraphs.append(Paragraph(t, self.speaker, text))
            self._break = False
        else:
            current.text += text
        self._last_t = t
        return new

    def mark_user(self, t: float) -> None:
        """Chat: a marker paragraph. Transcribe: the user's next words start a new paragraph."""
        if self.speaker is None:
            self._break = True
            return
        if self.paragraphs and self.paragraphs[-1].speaker == USER:
            return
        self.paragraphs.append(Paragraph(t, USER))

    def to_text(self) -> str:
        return "".join(p.line() + "\n" for p in self.paragraphs)
