"""Playback jitter buffer with a bounded lag: the rule of Kyutai's web client (its budgets, and
the other lag bounds, are in ``lag.py``).

Playback starts once one frame is queued, plus ``partial`` ms of silence. When more than
``initial + partial + max`` is queued, the oldest audio is dropped down to ``initial + partial``
and ``max`` grows by 5 ms; each underrun grows ``partial`` by 5 ms (both capped at 80 ms).
Two changes. Underruns while the producer delivers slower than real time do not grow ``partial``:
no amount of buffering prevents those, and a bigger budget would only add lag. And a budget that
went ``relax_s`` without an underrun (``partial``) or a drop (``max``) shrinks by 5 ms, so that one
bad moment does not cost latency for the rest of the conversation (the web client only grows them).
Drops crossfade and underruns fade out, so neither clicks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from . import FRAME_SIZE, SAMPLE_RATE
from .lag import JitterConfig

FADE = SAMPLE_RATE * 5 // 1000  # 5 ms


def _samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))


class _Chunk:
    __slots__ = ("pcm", "pos", "tag")

    def __init__(self, pcm: np.ndarray, tag: float | None):
        self.pcm, self.pos, self.tag = pcm, 0, tag

    def left(self) -> int:
        return len(self.pcm) - self.pos


class JitterBuffer:
    """``push`` frames as they come (any thread holding the owner's lock), ``pull`` device blocks.

    A frame's ``tag`` is the capture time of the microphone audio it answers; ``pull`` turns it
    into the end-to-end lag of what it plays (``last_lag``), on the same clock as ``dac_time``.
    """

    def __init__(self, config: JitterConfig | None = None):
        self.config = config or JitterConfig()
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.initial, self.partial, self.max = _samples(c.initial_ms), _samples(c.partial_ms), _samples(c.max_ms)
        self._chunks: deque[_Chunk] = deque()
        self.buffered = 0
        self.started = False
        self._silence_left = 0  # the partial wait before playing
        self._fade_in = False
        self._crossfade: np.ndarray | None = None  # audio cut by a drop, faded out under what follows
        self.dropped_samples = 0
        self.underruns = 0
        self.last_lag: float | None = None  # seconds, for the latest tagged audio played
        self.last_lag_at: float | None = None  # the DAC time of the block it was measured in
        self._arrival_interval = self._arrival_duration = None  # moving averages, seconds
        self._last_arrival: float | None = None
        self._partial_changed_at = self._max_changed_at = None  # when each budget last moved

    def push(self, pcm: np.ndarray, tag: float | None, now: float) -> None:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        self._track_rate(len(pcm), now)
        self._chunks.append(_Chunk(pcm, tag))
        self.buffered += len(pcm)
        if not self.started and self.buffered >= self.initial:
            self.started, self._silence_left, self._fade_in = True, self.partial, True
        if self.buffered >= self.max + self.partial + self.initial:
            self._drop(self.buffered - (self.initial + self.partial))
            self.max = min(self.max + _samples(self.config.step_ms), _samples(self.config.cap_ms))
            self._max_changed_at = now
        elif self._relaxed(self._max_changed_at, now) and self.max > _samples(self.config.max_ms):
            self.max -= _samples(self.config.step_ms)
            self._max_changed_at = now

    def _relaxed(self, changed_at: float | None, now: float) -> bool:
        if changed_at is None:
            return False
        return now - changed_at >= self.config.relax_s

    def _track_rate(self, n: int, now: float) -> None:
        duration = n / SAMPLE_RATE
        if self._last_arrival is not None:
            interval = now - self._last_arrival
            if self._arrival_interval is None:
                self._arrival_interval, self._arrival_duration = interval, duration
            else:
                self._arrival_interval += 0.2 * (interval - self._arrival_interval)
                self._arrival_duration += 0.2 * (duration - self._arrival_duration)
        self._last_arrival = now

    def producer_is_slow(self) -> bool:
        return self._arrival_interval is not None and self._arrival_interval > 1.05 * self._arrival_duration

    def _drop(self, n: int) -> None:
        cut = self._take(n, None, 0.0, 0)
        self.dropped_samples += n
        # What was cut continues what was last played: its start fades out under the new head.
        # (Nothing to continue if playback was silent: then the new head simply fades in.)
        if self._crossfade is None and self.started and not self._fade_in and self._silence_left == 0:
            self._crossfade = cut[:FADE]

    def _take(self, n: int, out: np.ndarray | None, dac_time: float, at: int) -> np.ndarray:
        """Remove n samples from the head (n <= buffered); into ``out[at:]`` or a new array."""
        got = np.empty(n, np.float32) if out is None else out[at:at + n]
        filled = 0
        while filled < n:
            chunk = self._chunks[0]
            k = min(chunk.left(), n - filled)
            if out is not None and chunk.tag is not None and self.last_lag_at != dac_time:
                self.last_lag = dac_time + (at + filled) / SAMPLE_RATE - (chunk.tag + chunk.pos / SAMPLE_RATE)
                self.last_lag_at = dac_time
            got[filled:filled + k] = chunk.pcm[chunk.pos:chunk.pos + k]
            chunk.pos += k
            filled += k
            if chunk.left() == 0:
                self._chunks.popleft()
        self.buffered -= n
        return got

    def pull(self, n: int, dac_time: float) -> np.ndarray:
        """The next n samples for the device; ``dac_time`` is when the first one is heard."""
        out = np.zeros(n, np.float32)
        if not self.started:
            return out
        at = min(self._silence_left, n)
        self._silence_left -= at
        k = min(n - at, self.buffered)
        if k:
            self._take(k, out, dac_time, at)
            if self._fade_in:
                m = min(FADE, k)
                out[at:at + m] *= np.linspace(0, 1, m, endpoint=False, dtype=np.float32)
                self._fade_in = False
            if self._crossfade is not None:
                m = min(len(self._crossfade), k)
                ramp = np.linspace(0, 1, m, endpoint=False, dtype=np.float32)
                out[at:at + m] = out[at:at + m] * ramp + self._crossfade[:m] * (1 - ramp)
                self._crossfade = None
        if self.buffered == 0:  # ran dry: fade out, and fade in whatever comes next
            m = min(FADE, k)
            if m:
                out[at + k - m:at + k] *= np.linspace(1, 0, m, dtype=np.float32)
            self._fade_in, self._crossfade = True, None
            if at + k < n:  # a gap: wait for a full frame again
                self.underruns += 1
                self.started = False
                if not self.producer_is_slow():
                    self.partial = min(self.partial + _samples(self.config.step_ms), _samples(self.config.cap_ms))
                    self._partial_changed_at = dac_time
        elif self._relaxed(self._partial_changed_at, dac_time) and self.partial > _samples(self.config.partial_ms):
            self.partial -= _samples(self.config.step_ms)
            self._partial_changed_at = dac_time
        return out

    @property
    def dropped_frames(self) -> float:
        return self.dropped_samples / FRAME_SIZE
