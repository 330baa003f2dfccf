"""The device-independent heart of full-duplex audio, on 24 kHz mono samples.

A device (PortAudio in ``duplex.py``, or a simulated clock in tests) calls ``playback`` and
``capture`` once per block with the stream's timestamps; the model side calls ``read_frame`` and
``play``. Between them: the jitter buffer, the far-end aligner, the echo canceller, stale-frame
skipping, meters and recording. All times are seconds on the device's clock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np

from . import FRAME_SIZE, SAMPLE_RATE
from .aec import AecConfig, EchoCanceller
from .errors import AudioError
from .jitter import JitterBuffer, JitterConfig
from .meters import LevelMeter, VoiceActivity
from .wav import WavWriter


@dataclass
class DuplexConfig:
    aec: bool = True
    max_input_age_ms: float = 40.0  # older microphone frames are skipped: the model hears the present
    jitter: JitterConfig = field(default_factory=JitterConfig)
    echo: AecConfig = field(default_factory=AecConfig)


@dataclass
class MicFrame:
    pcm: np.ndarray  # 1920 samples after echo cancellation
    captured_at: float  # when its first sample reached the microphone
    available_at: float  # when it was complete and ready to read


@dataclass
class AudioStats:
    input_db: float  # after echo cancellation: what the model hears
    output_db: float
    voice: bool  # the user seems to be talking
    aec: bool
    erle_db: float | None  # echo attenuation, once measurable
    echo_delay_ms: float | None  # speaker-to-microphone delay beyond the stream's own latency
    roundtrip_ms: float | None  # output plus input latency, from the stream timestamps
    lag_ms: float | None  # microphone capture to speaker, for what is playing now
    buffered_ms: float  # queued for playback
    dropped_frames: float  # playback audio dropped to bound the lag, in 80 ms frames
    underruns: int
    skipped_input_frames: int  # stale microphone frames the model never heard
    recording: str | None
    recording_error: str | None


class FarEndAligner:
    """Keeps what was sent to the speaker and says which of it was playing when each microphone
    sample was captured, from the DAC and ADC timestamps of the stream. The timestamps are wild
    for the first callbacks, so the offset is a median that skips them, and it is changed only
    when it drifts by more than ``tolerance_ms``."""

    def __init__(self, history_s: float = 4.0, skip: int = 10, window: int = 25, tolerance_ms: float = 4.0):
        self._far = np.zeros(int(history_s * SAMPLE_RATE), np.float32)
        self._written = 0  # far samples so far; the ring holds the last len(_far)
        self._last_block: tuple[int, float] | None = None  # (first index, DAC time)
        self._skip, self._tolerance = skip, tolerance_ms * SAMPLE_RATE / 1000
        self._observations: deque[float] = deque(maxlen=window)
        self.offset: int | None = None  # far index minus microphone index, for the same moment
        self.roundtrip_ms: float | None = None

    def played(self, pcm: np.ndarray, dac_time: float) -> None:
        self._last_block = (self._written, dac_time)
        n = len(self._far)
        idx = np.arange(self._written, self._written + len(pcm)) % n
        self._far[idx] = pcm
        self._written += len(pcm)

    def captured(self, mic_index: int, adc_time: float) -> bool:
        """Observe one capture block; True when the offset changed (the echo path moved)."""
        if self._last_block is None:
            return False
        far_index, dac_time = self._last_block
        if self._skip:
            self._skip -= 1
            return False
        self._observations.append(far_index - mic_index - (dac_time - adc_time) * SAMPLE_RATE)
        self.roundtrip_ms = (dac_time - adc_time) * 1000
        if len(self._observations) < 5:
            return False
        estimate = round(median(self._observations))
        if self.offset is None or abs(estimate - self.offset) > self._tolerance:
            changed = self.offset is not None
            self.offset = estimate
            return changed
        return False

    def reference(self, mic_index: int, n: int) -> np.ndarray | None:
        """Far-end samples heard during microphone samples mic_index..+n (zeros where unknown)."""
        if self.offset is None:
            return None
        start = mic_index + self.offset
        idx = np.arange(start, start + n)
        valid = (idx >= max(0, self._written - len(self._far))) & (idx < self._written)
        return np.where(valid, self._far[idx % len(self._far)], 0.0).astype(np.float32)


class DuplexCore:
    """Thread-safe: the device calls ``playback``/``capture``, the model ``read_frame``/``play``."""

    def __init__(self, config: DuplexConfig | None = None):
        self.config = config or DuplexConfig()
        self.condition = threading.Condition(threading.RLock())  # notified when a frame is ready
        self.jitter = JitterBuffer(self.config.jitter)
        self.aligner = FarEndAligner()
        self.canceller = EchoCanceller(self.config.echo) if self.config.aec else None
        self._frames: deque[MicFrame] = deque()
        self._max_age = self.config.max_input_age_ms / 1000
        self._pending = np.zeros(0, np.float32)  # captured samples not yet a whole frame
        self._pending_start = 0  # microphone index of _pending[0]
        self._mic_index = 0  # microphone samples captured so far
        self._adc_marks: deque[tuple[int, float]] = deque(maxlen=64)  # (index, ADC time) per block
        self.skipped_input_frames = 0
        self._in_meter, self._out_meter, self._vad = LevelMeter(), LevelMeter(), VoiceActivity()
        self._recorder: WavWriter | None = None
        self.recording_error: str | None = None

    # Device side -------------------------------------------------------------------------------

    def playback(self, n: int, dac_time: float) -> np.ndarray:
        """The next n samples for the speaker; dac_time is when the first will be heard."""
        with self.condition:
            out = self.jitter.pull(n, dac_time)
            self.aligner.played(out, dac_time)
            self._out_meter.update(out, n / SAMPLE_RATE)
            return out

    def capture(self, pcm: np.ndarray, adc_time: float, now: float) -> None:
        """Microphone samples whose first reached the ADC at adc_time, delivered at ``now``."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        with self.condition:
            if self.aligner.captured(self._mic_index, adc_time) and self.canceller is not None:
                self.canceller.realign()
            self._adc_marks.append((self._mic_index, adc_time))
            self._mic_index += len(pcm)
            self._pending = np.concatenate([self._pending, pcm])
            while len(self._pending) >= FRAME_SIZE:
                frame, self._pending = self._pending[:FRAME_SIZE], self._pending[FRAME_SIZE:]
                self._frame_captured(frame, self._pending_start, now)
                self._pending_start += FRAME_SIZE

    def _frame_captured(self, mic: np.ndarray, index: int, now: float) -> None:
        far = self.aligner.reference(index, FRAME_SIZE)
        clean = self.canceller.process(mic, far) if self.canceller is not None else mic
        self._in_meter.update(clean, FRAME_SIZE / SAMPLE_RATE)
        self._vad.update(clean, FRAME_SIZE / SAMPLE_RATE)
        self._record(clean, far)
        self._frames.append(MicFrame(clean, self._adc_time(index), now))
        while len(self._frames) > 1 and now - self._frames[0].available_at > self._max_age:
            self._frames.popleft()  # nobody is reading: keep memory bounded
            self.skipped_input_frames += 1
        self.condition.notify_all()

    def _adc_time(self, index: int) -> float:
        mark_index, mark_time = self._adc_marks[0]
        for i, t in self._adc_marks:
            if i > index:
                break
            mark_index, mark_time = i, t
        return mark_time + (index - mark_index) / SAMPLE_RATE

    # Model side --------------------------------------------------------------------------------

    def read_frame(self, now: float) -> MicFrame | None:
        """The oldest frame no older than ``max_input_age_ms``; older ones are skipped."""
        with self.condition:
            while self._frames and now - self._frames[0].available_at > self._max_age:
                self._frames.popleft()
                self.skipped_input_frames += 1
            return self._frames.popleft() if self._frames else None

    def play(self, pcm: np.ndarray, captured_at: float | None, now: float) -> None:
        """Queue model audio; ``captured_at`` is that of the microphone frame it answers."""
        with self.condition:
            self.jitter.push(pcm, captured_at, now)

    # Recording and stats -----------------------------------------------------------------------

    def start_recording(self, path: str | Path) -> None:
        """Stereo WAV: left what the user said (after echo cancellation), right what was playing."""
        writer = WavWriter(path, SAMPLE_RATE, channels=2)
        with self.condition:
            self.stop_recording()
            self._recorder, self.recording_error = writer, None

    def stop_recording(self) -> None:
        with self.condition:
            if self._recorder is not None:
                self._recorder.close()
                self._recorder = None

    def _record(self, mic: np.ndarray, far: np.ndarray | None) -> None:
        if self._recorder is None:
            return
        try:
            self._recorder.write(mic, far if far is not None else np.zeros_like(mic))
        except AudioError as exc:  # a full disk must not stop the conversation
            self.recording_error = str(exc)
            recorder, self._recorder = self._recorder, None
            try:
                recorder.close()
            except AudioError:
                pass  # already reported

    def stats(self) -> AudioStats:
        with self.condition:
            lag = self.jitter.last_lag
            return AudioStats(
                input_db=self._in_meter.db,
                output_db=self._out_meter.db,
                voice=self._vad.active,
                aec=self.canceller is not None,
                erle_db=self.canceller.erle_db if self.canceller else None,
                echo_delay_ms=self.canceller.delay_ms if self.canceller else None,
                roundtrip_ms=self.aligner.roundtrip_ms,
                lag_ms=None if lag is None else lag * 1000,
                buffered_ms=self.jitter.buffered * 1000 / SAMPLE_RATE,
                dropped_frames=self.jitter.dropped_frames,
                underruns=self.jitter.underruns,
                skipped_input_frames=self.skipped_input_frames,
                recording=str(self._recorder.path) if self._recorder else None,
                recording_error=self.recording_error,
            )
