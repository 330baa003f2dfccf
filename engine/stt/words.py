"""Words and segments from a stream of STT text tokens, and the listeners that receive them.

Numpy- and torch-free: the transcript writers (which ``moshi transcribe --help`` reads) build on it.

Words follow the published formula (``tokens_to_timestamped_text`` of Kyutai's delayed-streams-
modeling STT scripts): the text between two end-of-padding tokens is one word, or several split by
their token counts; token position p is at time ``p / FRAME_RATE - (silence prefix + delay)``; a
word ends where the next boundary is; the last one ends at EOS, else at the end of the stream but
at most one second after it starts.

Segments break where the model stops writing for ``pause_seconds`` or more, and, with the
semantic VAD heads, where it predicted the end of the turn (P(pause within 2 s) > 0.5) in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from audio import FRAME_RATE

from ..moshi.tokens import TEXT_EPAD, TEXT_PAD, Tokenizer, text_piece

# The VAD heads' horizons are 0.5, 1, 2 and 3 s; Kyutai and Unmute take the 2 s one for the end of a turn.
END_OF_TURN_HEAD = 2
END_OF_TURN_THRESHOLD = 0.5
LAST_WORD_MAX_FRAMES = FRAME_RATE  # the formula's cap on a last word with nothing after it: 1 s
DEFAULT_PAUSE_SECONDS = 1.0


@dataclass
class Word:
    text: str
    start: float  # seconds into the input
    end: float


@dataclass
class Segment:
    words: list[Word]
    end_reason: str  # "pause", "end_of_turn" or "end" (of the input)
    end_of_turn: float | None = None  # highest P(pause within 2 s) after its last word; None without VAD heads

    @property
    def start(self) -> float:
        return self.words[0].start

    @property
    def end(self) -> float:
        return self.words[-1].end

    @property
    def text(self) -> str:
        return " ".join(word.text for word in self.words)


class TranscriptListener:
    """What a transcription reports as it goes. Subclasses override what they need."""

    def on_token(self, token: int, piece: str | None, time: float) -> None:
        """Every frame's text token the moment the model writes it; ``piece`` is its text, None for padding."""

    def on_vad(self, time: float, pause: list[float]) -> None:
        """Each frame, with VAD heads: P(pause) within 0.5, 1, 2 and 3 s."""

    def on_word(self, word: Word) -> None:
        """A word whose start and end are final."""

    def on_segment(self, segment: Segment) -> None:
        """A finished segment; its words were all given to ``on_word`` before."""

    def on_end(self, complete: bool, duration: float) -> None:
        """No more words: the input ended (complete) or the run was stopped. ``duration``: seconds of input."""


class Listeners(TranscriptListener):
    """Several listeners as one, called in order."""

    def __init__(self, listeners: Iterable[TranscriptListener]):
        self.listeners = list(listeners)

    def on_token(self, token: int, piece: str | None, time: float) -> None:
        for listener in self.listeners:
            listener.on_token(token, piece, time)

    def on_vad(self, time: float, pause: list[float]) -> None:
        for listener in self.listeners:
            listener.on_vad(time, pause)

    def on_word(self, word: Word) -> None:
        for listener in self.listeners:
            listener.on_word(word)

    def on_segment(self, segment: Segment) -> None:
        for listener in self.listeners:
            listener.on_segment(segment)

    def on_end(self, complete: bool, duration: float) -> None:
        for listener in self.listeners:
            listener.on_end(complete, duration)


class WordAssembler:
    """One stream's text tokens in, one per frame; words with their times and segments out.

    Memory stays bounded: only the tokens since the last word boundary are kept.
    """

    def __init__(self, tokenizer: Tokenizer, offset_seconds: float, listener: TranscriptListener,
                 pause_seconds: float = DEFAULT_PAUSE_SECONDS):
        self.tokenizer = tokenizer
        self.offset = offset_seconds  # silence prefix + the model's delay
        self.listener = listener
        self.pause_frames = pause_seconds * FRAME_RATE
        self.position = 0  # of the next token
        self._eos = tokenizer.eos_id()
        self._span_start: int | None = None  # position after the last TEXT_EPAD; None before the first one
        self._span: list[tuple[int, int]] = []  # (position, token) of the text tokens since then
        self._span_eos: int | None = None  # first EOS since then
        self._last_text_at: int | None = None  # position of the last text token
        self._pause_max: float | None = None  # highest end-of-turn probability since that token
        self._segment: list[Word] = []
        self._finished = False

    def time(self, position: float) -> float:
        return position / FRAME_RATE - self.offset

    def push(self, token: int, pause: list[float] | None = None) -> None:
        position = self.position
        self.position += 1
        self.listener.on_token(token, text_piece(self.tokenizer, token), self.time(position))
        if token == TEXT_EPAD:
            if self._span_start is not None:
                self._emit_words(self._words(self._span_start, position, self._span))
            self._span_start, self._span, self._span_eos = position + 1, [], None
        elif self._span_start is not None:
            if token == self._eos and self._span_eos is None:
                self._span_eos = position
            if token > TEXT_PAD:
                if not self._span:
                    self._maybe_break(position)
                self._span.append((position, token))
        if token > TEXT_PAD:
            self._last_text_at, self._pause_max = position, None
        if pause is not None:
            self.listener.on_vad(self.time(position), pause)
            p = pause[END_OF_TURN_HEAD]
            self._pause_max = p if self._pause_max is None else max(self._pause_max, p)

    def finish(self, complete: bool = True, duration: float = 0.0) -> None:
        """The stream ended: the last word ends at EOS, one second after it starts, or at the end."""
        if self._finished:
            return
        self._finished = True
        if self._span_start is not None:
            end = self._span_eos if self._span_eos is not None else min(
                self.position, self._span_start + LAST_WORD_MAX_FRAMES)
            self._emit_words(self._words(self._span_start, end, [(p, t) for p, t in self._span if p < end]))
        if self._segment:
            self.listener.on_segment(Segment(self._segment, "end", self._pause_max))
            self._segment = []
        self.listener.on_end(complete, duration)

    def _maybe_break(self, position: int) -> None:
        """Speech resumes at ``position``: close the current segment if there was a pause or an end of turn."""
        if not self._segment or self._last_text_at is None:
            return
        if self._pause_max is not None and self._pause_max > END_OF_TURN_THRESHOLD:
            reason = "end_of_turn"
        elif position - self._last_text_at - 1 >= self.pause_frames:
            reason = "pause"
        else:
            return
        self.listener.on_segment(Segment(self._segment, reason, self._pause_max))
        self._segment = []

    def _emit_words(self, words: list[Word]) -> None:
        for word in words:
            self.listener.on_word(word)
            self._segment.append(word)

    def _words(self, start: int, end: float, span: list[tuple[int, int]]) -> list[Word]:
        names = self.tokenizer.decode([t for _, t in span]).split()
        if not names:
            return []
        words = []
        # Several words with no boundary between them: each gets as many frames as it has tokens.
        for name in names[:-1]:
            count = len(self.tokenizer.encode(name))
            words.append(self._word(name, start, start + count))
            start += count
        words.append(self._word(names[-1], start, end))
        return words

    def _word(self, text: str, start: float, end: float) -> Word:
        return Word(text, max(0.0, self.time(start)), max(0.0, self.time(end)))
