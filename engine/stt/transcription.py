"""Streaming transcription: audio of any length in, timed words and segments out as they are known
(``words.py`` turns the tokens into words).

Padding follows Kyutai's ``moshi-inference`` for STT checkpoints: the checkpoint's silence prefix
before the audio, ``delay + 1 s`` of silence after it so the words still in flight come out, and
only whole frames. The model never sees the first frame it is given (its first step reads only
the initial tokens), so each stream's first step is thrown away and frame k is read by step k + 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from audio import FRAME_SIZE, SAMPLE_RATE

from .words import DEFAULT_PAUSE_SECONDS, TranscriptListener, WordAssembler


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
    failed: list[tuple[int, Exception]] = field(default_factory=list)  # (input's index, why it could not be read)

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time: below 1 is faster than real time."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")


@dataclass
class _Slot:
    index: int  # of its input, in the order they were given
    frames: Iterator[np.ndarray]
    words: WordAssembler
    audio_samples: int = 0
    codes: object = None  # torch.Tensor: the codes of the frame read last step, which the LM reads this step
    fresh: bool = True  # its first LM step reads only initial tokens; the output is dropped
    draining: bool = False  # input exhausted: one more step gives the last frame's token
    error: Exception | None = None  # why its input could not be read to the end


class BatchTranscriber:
    """Transcribes many inputs on one batched model; a slot whose input ends takes the next one.

    Each input is an iterable of 24 kHz mono float32 blocks of any length, read as the model goes,
    so an hour of audio costs no more memory than a minute. An input whose blocks raise one of
    `input_errors` (a file that cannot be decoded) ends there, incomplete: `on_failure` hears of it
    at once, `RunStats.failed` at the end, and the other inputs go on.
    """

    def __init__(self, runner, pause_seconds: float = DEFAULT_PAUSE_SECONDS,
                 input_errors: tuple[type[Exception], ...] = (),
                 on_failure: Callable[[int, Exception], None] = lambda index, error: None):
        self.runner = runner  # engine.stt.runner.TranscribeRunner
        self.pause_seconds = pause_seconds
        self.input_errors = input_errors
        self.on_failure = on_failure
        self._taken = 0
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
                        self._finish(slot, slot.error is None, stats)
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
        slot = _Slot(self._taken, iter(()), words)
        self._taken += 1
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
                try:
                    frame = next(slot.frames, None)
                except self.input_errors as exc:
                    frame, slot.error = None, exc
                    stats.failed.append((slot.index, exc))
                    self.on_failure(slot.index, exc)
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
