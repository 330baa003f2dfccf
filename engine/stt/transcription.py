"""Streaming transcription: audio of any length in, timed words and segments out as they are known.

Padding follows Kyutai's ``moshi-inference`` for STT checkpoints: the checkpoint's silence prefix
before the audio, ``delay + 1 s`` of silence after it so the words still in flight come out, and
only whole frames. The model never sees the first frame it is given (its first step reads only
the initial tokens), so each stream's first step is thrown away and frame k is read by step k + 1.

Words follow the published formula (``tokens_to_timestamped_text`` of Kyutai's delayed-streams-
modeling STT scripts): the text between two end-of-padding tokens is one word, or several split by
their token counts; token position p is at time ``p / FRAME_RATE - (silence prefix + delay)``; a
word ends where the next boundary is; the last one ends at EOS, else at the end of the stream but
at most one second after it starts.

Segments break where the model stops writing for ``pause_seconds`` or more, and, with the
semantic VAD heads, where it predicted the end of the turn (P(pause within 2 s) > 0.5) in between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from audio import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

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


class Framer:
    """Cuts blocks of samples of any length into whole frames, keeping the remainder for later."""

    def __init__(self, prefix_samples: int = 0):
        self._pending = np.zeros(prefix_samples, np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """The frames completed by ``pcm``, [n, FRAME_SIZE]."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, np.float32).reshape(-1)])
        whole = len(self._pending) // FRAME_SIZE * FRAME_SIZE
        frames = self._pending[:whole].reshape(-1, FRAME_SIZE)
        self._pending = self._pending[whole:]
        return frames


def padded_frames(blocks: Iterable[np.ndarray], prefix_samples: int, suffix_samples: int) -> Iterator[np.ndarray]:
    """Whole frames of ``prefix zeros + blocks + suffix zeros``; a last partial frame is dropped."""
    framer = Framer(prefix_samples)
    for block in blocks:
        yield from framer.push(block)
    yield from framer.push(np.zeros(suffix_samples, np.float32))


def padding_samples(prefix_seconds: float, delay_seconds: float) -> tuple[int, int]:
    """Silence before and after an input, as ``moshi-inference`` pads it."""
    return int(prefix_seconds * SAMPLE_RATE), int((delay_seconds + 1.0) * SAMPLE_RATE)


@dataclass
class RunStats:
    steps: int = 0  # LM steps (each one frame for every slot)
    frames: int = 0  # frames that belonged to an input, padding included
    audio_seconds: float = 0.0  # of input, padding excluded
    wall_seconds: float = 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time: below 1 is faster than real time."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")


@dataclass
class _Slot:
    frames: Iterator[np.ndarray]
    words: WordAssembler
    audio_samples: int = 0
    codes: object = None  # torch.Tensor: the codes of the frame read last step, which the LM reads this step
    fresh: bool = True  # its first LM step reads only initial tokens; the output is dropped
    draining: bool = False  # input exhausted: one more step gives the last frame's token


class BatchTranscriber:
    """Transcribes many inputs on one batched model; a slot whose input ends takes the next one.

    Each input is an iterable of 24 kHz mono float32 blocks of any length, read as the model goes,
    so an hour of audio costs no more memory than a minute.
    """

    def __init__(self, runner, pause_seconds: float = DEFAULT_PAUSE_SECONDS):
        self.runner = runner  # engine.stt.runner.TranscribeRunner
        self.pause_seconds = pause_seconds
        self.offset = runner.silence_prefix_seconds + runner.delay_seconds
        self.prefix, self.suffix = padding_samples(runner.silence_prefix_seconds, runner.delay_seconds)

    def run(self, inputs: Iterable[tuple[Iterable[np.ndarray], TranscriptListener]]) -> RunStats:
        """``inputs`` is consumed lazily: an input is opened when a slot frees up for it."""
        runner = self.runner
        queue = iter(inputs)
        slots: list[_Slot | None] = [self._take(queue) for _ in range(runner.batch_size)]
        stats = RunStats()
        start = time.perf_counter()
        try:
            while any(slots):
                self._step(slots, stats)
                for i, slot in enumerate(slots):
                    if slot is not None and slot.draining and not slot.fresh:
                        slots[i] = None
                        self._finish(slot, True, stats)
                        slots[i] = self._take(queue)
                        if slots[i] is not None:
                            runner.reset_slots([i])
        except BaseException:
            for slot in slots:
                if slot is not None:
                    self._finish(slot, False, stats)
            raise
        finally:
            stats.wall_seconds = time.perf_counter() - start
        return stats

    def _take(self, queue) -> _Slot | None:
        item = next(queue, None)
        if item is None:
            return None
        blocks, listener = item
        words = WordAssembler(self.runner.models.tokenizer, self.offset, listener, self.pause_seconds)
        slot = _Slot(iter(()), words)
        slot.frames = padded_frames(self._counted(blocks, slot), self.prefix, self.suffix)
        return slot

    @staticmethod
    def _counted(blocks: Iterable[np.ndarray], slot: _Slot) -> Iterator[np.ndarray]:
        for block in blocks:
            slot.audio_samples += len(block)
            yield block

    def _step(self, slots: list[_Slot | None], stats: RunStats) -> None:
        """Each slot's LM step reads the frame it was given the step before, so the encoder (in a
        process of its own on a CPU) takes this step's frames while the LM runs."""
        runner = self.runner
        pcm = np.zeros((runner.batch_size, FRAME_SIZE), np.float32)
        for i, slot in enumerate(slots):
            if slot is not None and not slot.draining:
                frame = next(slot.frames, None)
                if frame is None:
                    slot.draining = True
                else:
                    pcm[i] = frame
                    stats.frames += 1
        runner.submit(pcm)
        lm_codes = runner.no_codes()
        for i, slot in enumerate(slots):
            if slot is not None and slot.codes is not None:
                lm_codes[i] = slot.codes
        out = runner.lm_step(lm_codes)
        codes = runner.collect()
        stats.steps += 1
        for i, slot in enumerate(slots):
            if slot is None:
                continue
            if not slot.fresh:
                slot.words.push(out.tokens[i], out.vad[i] if out.vad else None)
            slot.fresh = False
            slot.codes = None if slot.draining else codes[i]

    def _finish(self, slot: _Slot, complete: bool, stats: RunStats) -> None:
        stats.audio_seconds += slot.audio_samples / SAMPLE_RATE
        slot.words.finish(complete, slot.audio_samples / SAMPLE_RATE)


class LiveTranscriber:
    """One live stream (a microphone) on a batch-1 runner: blocks in as they come, words out.

    The runner's ``step`` gives the same tokens as the batch path: one frame sooner than it (the
    first frame fed twice) in this process, or as the batch path does with Mimi in its own process.
    """

    def __init__(self, runner, listener: TranscriptListener, pause_seconds: float = DEFAULT_PAUSE_SECONDS):
        self.runner = runner  # engine.stt.runner.TranscribeRunner with batch size 1
        self.words = WordAssembler(runner.models.tokenizer, runner.silence_prefix_seconds + runner.delay_seconds,
                                   listener, pause_seconds)
        prefix, self.suffix = padding_samples(runner.silence_prefix_seconds, runner.delay_seconds)
        self.framer = Framer(prefix)
        self.stats = RunStats()
        self._samples = 0

    def push(self, pcm: np.ndarray) -> None:
        self._samples += len(pcm)
        self.stats.audio_seconds = self._samples / SAMPLE_RATE
        self._feed(pcm)

    def finish(self, complete: bool = True) -> None:
        """Flush the words still in flight with the checkpoint's trailing silence, then end."""
        self._feed(np.zeros(self.suffix, np.float32))
        last = self.runner.flush()
        if last is not None:
            self._take(last)
        self.words.finish(complete, self.stats.audio_seconds)

    def _feed(self, pcm: np.ndarray) -> None:
        for frame in self.framer.push(pcm):
            self.stats.frames += 1
            self._take(self.runner.step(frame))

    def _take(self, out) -> None:
        self.stats.steps += 1
        self.stats.wall_seconds += out.timings_ms["total"] / 1000
        if out.token is not None:  # None: a pipelined runner's first step, which answers for no frame
            self.words.push(out.token, out.vad)
