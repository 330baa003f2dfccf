"""Echo cancellation: delay search, speex MDF with an aligned reference, and an echo suppressor.

``EchoCanceller.process(mic, far)`` takes one 80 ms frame of microphone audio and the far-end
audio that was reaching the speaker at the same moments (aligned by the stream timestamps, see
``core.FarEndAligner``). What is left to find is the acoustic part of the delay plus any timestamp
error: a GCC-PHAT search finds it within a few hundred ms of far-end speech, and the reference
given to speex is delayed by it, so that the adaptive filter's tail covers the room response
rather than the delay (a 256 ms filter removes nothing at a 300 ms delay).

Speex needs seconds to converge, so a suppressor follows it. It learns how much of the far end's
power still reaches the output (a running median of that ratio over echo-only moments) and
attenuates what that explains. Before it has learned anything it assumes a loud echo (+10 dB),
which removes echo from the first words; as speex converges the learned coupling falls and the
suppressor gets out of the way. Moments where the microphone or the output holds more than the
far end explains (the user talking) are not learned from, so double talk passes.

Speex runs on 80 ms frames: in double talk they kept the near talker cleaner than 20 ms frames
in our measurements (``benchmarks/aec.py``'s scene), and they are the model's frames, so they add no latency. Speex's own
preprocessor is not used: its residual-echo suppressor delays the output by a frame (80 ms here)
and costs more near-end quality in double talk than this suppressor (benchmarks/aec.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import FRAME_SIZE, SAMPLE_RATE
from .speex import SpeexEcho

SUBFRAME = SAMPLE_RATE * 20 // 1000  # the suppressor's time resolution
MAX_DRIFT_STEP = 2.0  # samples off the delay's course at a search: more is a jump or a new drift
MAX_DRIFT = 0.005 * FRAME_SIZE  # 5 ms/s, in samples per frame


@dataclass
class AecConfig:
    tail_ms: int = 128  # speex filter length after alignment (speex rounds up to whole frames: 160 ms)
    margin_ms: int = 5  # the reference leads the echo by this much: room for the resamplers' pre-ringing
    max_delay_ms: int = 300  # delay search range beyond the timestamp alignment
    search_history_s: float = 2.0
    confidence: float = 20.0  # GCC-PHAT peak over its RMS to lock on a delay (speech without echo: < 14)
    track_confidence: float = 10.0  # enough to follow it (a drifting delay smears the peak)
    track_every_s: float = 0.5  # delay re-estimation once locked (clock drift, server latency moves)
    track_window_s: float = 1.0  # shorter than the lock's: a drift smears a long window
    room_t60_s: float = 0.15  # how long far-end power keeps feeding echo
    suppress_gain: float = 2.0  # over-subtraction of the estimated residual echo
    suppress_floor_db: float = -25.0
    prior_coupling_db: float = 10.0  # assumed echo level relative to the far end, before learning
    learn_step_db: float = 1.0  # per 20 ms
    near_margin: float = 4.0  # output this far above the explained echo counts as the user talking
    far_active_dbfs: float = -60.0


def _power(x: np.ndarray) -> float:
    return float(np.dot(x, x)) / len(x)


class DelayEstimator:
    """GCC-PHAT between the far-end reference and the microphone over the last few seconds."""

    def __init__(self, max_delay: int, history: int, min_far_dbfs: float):
        self.max_delay, self.history = max_delay, history
        self.min_far_power = 10 ** (min_far_dbfs / 10)
        self.clear()

    def clear(self) -> None:
        self._far = np.zeros(0, np.float32)
        self._mic = np.zeros(0, np.float32)


    def add(self, far: np.ndarray, mic: np.ndarray) -> None:
        self._far = np.concatenate([self._far, far])[-self.history:]
        self._mic = np.concatenate([self._mic, mic])[-self.history:]

    def estimate(self, seconds: float | None = None) -> tuple[float, float] | None:
        """(delay in samples, confidence) over the last ``seconds`` (default: all kept), or None
        without enough far-end audio. A drifting delay comes out as its value mid-window."""
        n = len(self._far) if seconds is None else min(len(self._far), int(seconds * SAMPLE_RATE))
        far, mic = self._far[len(self._far) - n:], self._mic[len(self._mic) - n:]
        if n < SAMPLE_RATE // 4 or _power(far) < self.min_far_power:
            return None
        size = 1 << int(np.ceil(np.log2(n + self.max_delay)))
        cross = np.fft.rfft(mic, size) * np.conj(np.fft.rfft(far, size))
        freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
        # Partial PHAT whitening over the speech band: sharp peaks without amplifying empty bins.
        weight = ((freqs > 200) & (freqs < 6000)) / (np.abs(cross) ** 0.8 + 1e-12)
        corr = np.fft.irfft(cross * weight, size)[: self.max_delay]
        peak = int(np.argmax(corr))
        confidence = float(corr[peak] / (np.sqrt(np.mean(corr**2)) + 1e-30))
        if 0 < peak < len(corr) - 1:  # a parabola through the peak: the delay to a fraction of a sample
            left, mid, right = corr[peak - 1:peak + 2]
            curvature = left - 2 * mid + right
            if curvature < 0:
                return peak + 0.5 * (left - right) / curvature, confidence
        return float(peak), confidence


class _Coupling:
    """Running median of power ratios in the log domain, learned only from echo-only moments."""

    def __init__(self, prior: float):
        self.value = prior

    def learn(self, ratio: float, step: float) -> None:
        self.value *= math.exp(step if ratio > self.value else -step)


class EchoSuppressor:
    """Attenuates what the far end still explains in the canceller's output (see module doc)."""

    def __init__(self, config: AecConfig):
        self.config = config
        self._decay = 10 ** (-6 * (SUBFRAME / SAMPLE_RATE) / config.room_t60_s)  # -60 dB over T60
        self._window = int(np.ceil((config.max_delay_ms / 1000 + config.room_t60_s) * SAMPLE_RATE / SUBFRAME))
        self._step = math.log(10 ** (config.learn_step_db / 10))
        self._floor = 10 ** (config.suppress_floor_db / 20)
        self._far_active = 10 ** (config.far_active_dbfs / 10)
        self.reset()

    def reset(self) -> None:
        prior = 10 ** (self.config.prior_coupling_db / 10)
        self.mic_coupling = _Coupling(prior)  # far end -> microphone: the room, nearly constant
        self.coupling = _Coupling(prior)  # far end -> canceller output: falls as speex converges
        self._spread = 0.0
        self._recent = [0.0] * self._window
        self._gain = 1.0
        self._far_subframes = 0
        self.echo_only = 0.0  # share of recent moments with the far end talking and the user not
        self.mic_power = self.out_power = 0.0  # moving averages over echo-only moments

    def process(self, mic: np.ndarray, out: np.ndarray, ref: np.ndarray, aligned: bool) -> np.ndarray:
        far = _power(ref)
        if aligned:  # the echo follows the reference within the room's decay
            self._spread = max(far, self._decay * self._spread)
            spread = self._spread
        else:  # it could be anywhere in the search range
            self._recent = self._recent[1:] + [far]
            spread = max(self._recent)
        residual = _power(out) + 1e-12
        gain = min(1.0, max(self._floor, 1 - self.config.suppress_gain * self.coupling.value * spread / residual))
        if spread > self._far_active:
            # Until the far end has played for longer than any delay we search, its echo may not
            # have arrived yet: learn slowly then, as a fast fall would forget the echo before it comes.
            self._far_subframes += 1
            step = self._step if aligned or self._far_subframes > self._window else self._step / 10
            mic_ratio, out_ratio = _power(mic) / spread, residual / spread
            near = self.config.near_margin
            # (The microphone, not the output, says whether the user talks: a moved echo leaves the
            # output loud too, and must not pass for the user.)
            self.echo_only += 0.05 * ((mic_ratio < near * self.mic_coupling.value) - self.echo_only)
            if mic_ratio < near * self.mic_coupling.value:
                self.mic_coupling.learn(mic_ratio, step)
                # Once speex has converged the output shows the user far more clearly than the
                # microphone does (they are level with the echo there), so both must agree.
                if out_ratio < near * self.coupling.value:
                    self.coupling.learn(out_ratio, step)
                # The attenuation is averaged with a looser gate, so that the residual's own
                # ups and downs count, but the user talking (far above the residual) does not.
                if out_ratio < near**2 * self.coupling.value:
                    self.mic_power += 0.05 * (_power(mic) - self.mic_power)
                    self.out_power += 0.05 * (residual * gain**2 - self.out_power)
        ramp = np.linspace(self._gain, gain, len(out), endpoint=False, dtype=np.float32)  # no steps
        self._gain = gain
        return out * ramp

    @property
    def erle_db(self) -> float | None:
        """Echo attenuation (canceller and suppressor) over recent echo-only moments."""
        if self.out_power <= 0:
            return None
        return 10 * math.log10((self.mic_power + 1e-12) / (self.out_power + 1e-12))


class EchoCanceller:
    """80 ms frames in, 80 ms frames out, no added latency. ``far=None``: no reference yet.

    The echo delay is followed as it moves. Two sound cards drift apart by tens of ppm, and a
    sound server resizing its buffers makes the delay jump (both seen through PulseAudio here);
    a speex filter misaligned by a sample loses most of its cancellation. So once locked, the
    delay is measured again every ``track_every_s`` to a fraction of a sample, and the reference
    is read at that fractional position: a drift is followed smoothly, and a confirmed jump
    restarts speex at the new delay while the suppressor covers its convergence."""

    def __init__(self, config: AecConfig | None = None):
        self.config = c = config or AecConfig()
        self._max_delay = c.max_delay_ms * SAMPLE_RATE // 1000
        self._margin = c.margin_ms * SAMPLE_RATE / 1000
        self._speex = SpeexEcho(FRAME_SIZE, c.tail_ms * SAMPLE_RATE // 1000, SAMPLE_RATE)
        self._search = DelayEstimator(self._max_delay, int(c.search_history_s * SAMPLE_RATE), c.far_active_dbfs)
        self._track_every = max(1, round(c.track_every_s * SAMPLE_RATE / FRAME_SIZE))
        self.suppressor = EchoSuppressor(c)
        self._far = np.zeros(self._max_delay + 2 * FRAME_SIZE, np.float32)
        self.realign()

    def realign(self) -> None:
        """Forget the echo path (the timing between speaker and microphone changed)."""
        self.delay: float | None = None  # samples: where the echo is now
        self._previous_delay: float | None = None  # the last frame's (the reference moves smoothly)
        self._speex.reset()
        self._search.clear()
        self.suppressor.reset()
        self._far[:] = 0
        self._since_search = 0
        self._searches = 0  # since the last lock
        self._candidate: float | None = None  # before the lock: a delay seen once
        self._frame = 0  # frames since the lock: the time axis of the delay's model
        self._drift = 0.0  # samples per frame
        self._fits: list[tuple[float, float]] = []  # (frame, delay) searches that fit the model
        self._misfits: list[tuple[float, float]] = []  # searches in a row that did not

    def process(self, mic: np.ndarray, far: np.ndarray | None) -> np.ndarray:
        mic = np.asarray(mic, np.float32)
        if mic.shape != (FRAME_SIZE,):
            raise ValueError(f"echo canceller frames must hold {FRAME_SIZE} samples, got {mic.shape}")
        if far is None:
            return mic.copy()
        far = np.asarray(far, np.float32)
        self._far = np.concatenate([self._far[FRAME_SIZE:], far])
        self._search.add(far, mic)
        self._track_delay()
        if self.delay is None:
            out, ref = mic, far
        else:
            self._frame += 1
            self.delay += self._drift
            start = self.delay if self._previous_delay is None else self._previous_delay
            ref = self._reference(start, self.delay)
            self._previous_delay = self.delay
            out = self._speex.cancel(_to_int16(mic), _to_int16(ref)).astype(np.float32) / 32768
        return np.concatenate([
            self.suppressor.process(mic[i:i + SUBFRAME], out[i:i + SUBFRAME], ref[i:i + SUBFRAME], self.delay is not None)
            for i in range(0, FRAME_SIZE, SUBFRAME)
        ])

    def _reference(self, delay_start: float, delay_end: float) -> np.ndarray:
        """The far end delayed by (delay - margin), moving linearly across the frame: cubic
        (4-point Lagrange) interpolation between samples."""
        shift = np.clip(np.linspace(delay_start, delay_end, FRAME_SIZE, endpoint=False) - self._margin,
                        0.0, len(self._far) - FRAME_SIZE - 2)
        pos = len(self._far) - FRAME_SIZE + np.arange(FRAME_SIZE) - shift
        i = np.floor(pos).astype(np.int64)
        f = (pos - i).astype(np.float32)
        h = self._far
        nxt = np.minimum(i + 1, len(h) - 1)
        after = np.minimum(i + 2, len(h) - 1)
        return (h[i - 1] * (-f * (f - 1) * (f - 2) / 6) + h[i] * ((f + 1) * (f - 1) * (f - 2) / 2)
                + h[nxt] * (-(f + 1) * f * (f - 2) / 2) + h[after] * ((f + 1) * f * (f - 1) / 6))

    def _track_delay(self) -> None:
        self._since_search += 1
        if self.delay is not None:
            every = self._track_every
        else:  # every frame at first; slower if nothing is found (headphones: no echo to find)
            every = 1 if self._searches < 40 else 6
        if self._since_search < every:
            return
        if self.delay is not None and self.suppressor.echo_only < 0.5:
            return  # the user is talking: the search would see them as much as the echo
        self._since_search = 0
        self._searches += 1
        window = None if self.delay is None else self.config.track_window_s
        found = self._search.estimate(window)
        needed = self.config.confidence if self.delay is None else self.config.track_confidence
        if found is None or found[1] < needed:
            return
        measured = found[0]
        if self.delay is None:  # lock when two searches in a row agree
            if self._candidate is not None and abs(measured - self._candidate) <= SAMPLE_RATE / 1000:
                self._start_at([(0.0, measured)], 0.0)
            self._candidate = measured
            return
        self._follow(measured, self._frame - window * SAMPLE_RATE / FRAME_SIZE / 2)

    def _follow(self, measured: float, frame: float) -> None:
        """A search saw ``measured`` as the delay in the middle of its window, at ``frame``."""
        expected = self.delay - self._drift * (self._frame - frame)
        if abs(measured - expected) <= MAX_DRIFT_STEP:  # on course: refine the delay and its drift
            self._misfits.clear()
            self._fits = (self._fits + [(frame, measured)])[-4:]
            if len(self._fits) >= 3:
                frames, delays = np.array(self._fits).T
                self._drift, intercept = np.polyfit(frames, delays, 1)
                self.delay = intercept + self._drift * self._frame
            else:
                self.delay = measured + self._drift * (self._frame - frame)
            return
        # Off course: a jump (a sound server resizing its buffer) or a change of drift. It counts
        # once a second search, a frame later, sees it too (one straddling a jump may see either
        # side); the two give the new delay and drift. Speex then starts over there (its filter
        # learned the old delay), and until it has converged again the suppressor takes the
        # room's echo as it was before any cancellation.
        if self.suppressor.echo_only < 0.8:
            return  # not while the user may be talking: a restart would cost them their voice
        self._misfits.append((frame, measured))
        if len(self._misfits) < 2:
            self._since_search = self._track_every - 1
            return
        (f1, d1), (f2, d2) = self._misfits[-2:]
        drift = (d2 - d1) / (f2 - f1)
        self._start_at(self._misfits[-2:], drift if abs(drift) <= MAX_DRIFT else 0.0)
        self._speex.reset()
        self.suppressor.coupling.value = self.suppressor.mic_coupling.value

    def _start_at(self, fits: list[tuple[float, float]], drift: float) -> None:
        frame, delay = fits[-1]
        self._fits, self._misfits, self._drift = list(fits), [], drift
        self.delay, self._previous_delay = delay + drift * (self._frame - frame), None

    @property
    def delay_ms(self) -> float | None:
        return None if self.delay is None else self.delay * 1000 / SAMPLE_RATE

    @property
    def erle_db(self) -> float | None:
        return self.suppressor.erle_db


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)
