"""A simulated clock that drives DuplexCore like a PortAudio duplex stream, and a simulated
engine that reads microphone frames and answers each with one frame after a set step time.

Time runs in whole samples, so that events due at the same moment are ordered as stated (the
engine's answer before the device callback) rather than by rounding."""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from audio import FRAME_SIZE, SAMPLE_RATE
from audio.core import DuplexCore, MicFrame

BLOCK = SAMPLE_RATE * 20 // 1000
NEVER = 1 << 62


_SPEECH_BAND = np.sinc(2 * 3500 / SAMPLE_RATE * np.arange(-32, 33)) * np.hanning(65) * (2 * 3500 / SAMPLE_RATE)


def answer(k: int) -> np.ndarray:
    """The simulated model's voice for its k-th step: noise below 3.5 kHz with a syllable rhythm.
    Broadband like speech, and no steady tone (the speex filter copes badly with a strong tone
    that stops)."""
    t = (k * FRAME_SIZE + np.arange(FRAME_SIZE)) / SAMPLE_RATE
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.7 * t)
    noise = np.random.default_rng(k).standard_normal(FRAME_SIZE + len(_SPEECH_BAND) - 1)
    return (np.convolve(noise, _SPEECH_BAND, "valid") * 0.15 * envelope).astype(np.float32)


@dataclass
class Simulation:
    core: DuplexCore
    step_s: Callable[[float], float]  # the engine's time for one step, by start time
    mic: Callable[[int, int], np.ndarray] = lambda start, n: np.zeros(n, np.float32)  # near-end sound
    echo_gain: float = 0.0  # what the microphone hears of the speaker
    echo_delay_s: float = 0.0  # acoustic delay, on top of the stream latencies
    input_latency_s: float = 0.0
    output_latency_s: float = 0.0
    # When tagged audio played, and its lag (seconds); compact, as a long run holds millions.
    lag_times: array = field(default_factory=lambda: array("d"))
    lags: array = field(default_factory=lambda: array("d"))
    on_frame: Optional[Callable[[MicFrame], None]] = None  # sees each frame the engine reads
    answers: deque = field(default_factory=lambda: deque(maxlen=100))  # the engine's latest answers
    clock: int = 0  # samples
    _next_tick: int = 0
    _busy_until: int = NEVER
    _answer: tuple[np.ndarray, float] | None = None
    _mic_index: int = 0
    frames_read: int = 0
    _played: list[np.ndarray] = field(default_factory=list)

    @property
    def now(self) -> float:
        return self.clock / SAMPLE_RATE

    def run(self, seconds: float) -> None:
        end = self.clock + int(seconds * SAMPLE_RATE)
        while self.clock < end:
            self.clock = min(self._next_tick, self._busy_until)
            if self.clock == self._busy_until:
                pcm, tag = self._answer
                self.core.play(pcm, tag, self.now)
                self._busy_until, self._answer = NEVER, None
            if self.clock == self._next_tick:
                self._tick()
                self._next_tick += BLOCK
            if self._answer is None:
                frame = self.core.read_frame(self.now)
                if frame is not None:
                    self.frames_read += 1
                    if self.on_frame:
                        self.on_frame(frame)
                    self._answer = (answer(self.frames_read), frame.captured_at)
                    self.answers.append(self._answer[0])
                    self._busy_until = self.clock + int(round(self.step_s(self.now) * SAMPLE_RATE))

    def _tick(self) -> None:
        t = self.now
        dac = t + self.output_latency_s
        out = self.core.playback(BLOCK, dac)
        self._played.append(out)
        mic = self.mic(self._mic_index, BLOCK).astype(np.float32)
        if self.echo_gain:
            lag = int(round((self.echo_delay_s + self.output_latency_s + self.input_latency_s) * SAMPLE_RATE))
            played = np.concatenate(self._played[-(lag // BLOCK + 3):])
            # `played` ends with the block written now; the one before it plays during this capture.
            start = len(played) - 2 * BLOCK - lag
            if start >= 0:
                mic = mic + self.echo_gain * played[start:start + BLOCK]
        self._played = self._played[-64:]
        self.core.capture(mic, t - BLOCK / SAMPLE_RATE - self.input_latency_s, t)
        self.core.process_captured()
        self._mic_index += BLOCK
        if self.core.jitter.last_lag_at == dac:
            self.lag_times.append(t)
            self.lags.append(self.core.jitter.last_lag)
