"""The device-independent heart of full-duplex audio, on 24 kHz mono samples.

A device (PortAudio in ``duplex.py``, or a simulated clock in tests) calls ``playback`` and
``capture`` once per block with the stream's timestamps, and ``process_captured`` (echo
cancellation) off its audio thread; the model side calls ``read_frame`` and ``play``. Between them: the jitter buffer, the far-end aligner, the echo canceller, stale-frame
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
from .jitter import JitterBuffer
from .lag import MAX_INPUT_AGE_MS, JitterConfig
from .meters import SILENCE_DB, LevelMeter, VoiceActivity
from .wav import WavWriter


# The canceller gets the far end 10 ms ahead of what the timestamps say was playing, so that the
# echo always comes after its reference even when they overstate the latency a little (the
# acoustic delay itself is a few ms), and its delay can be followed both ways.
REFERENCE_LEAD = SAMPLE_RATE * 10 // 1000


@dataclass
class DuplexConfig:
    aec: bool = True
    max_input_age_ms: float = MAX_INPUT_AGE_MS  # older microphone frames are skipped (lag.py)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    echo: AecConfig = field(default_factory=AecConfig)


@dataclass
class MicFrame:
    pcm: np.ndarray  # 1920 samples after echo cancellation
    captured_at: float  # when its first sample reached the microphone
    available_at: float  # when it was complete and ready to read


@dataclass(frozen=True)
class AudioStats:
    """What the audio layer measured, as the app shows and logs it. A source without devices (a
    file) fills in only the levels: the defaults are "nothing measured"."""

    input_db: float = SILENCE_DB  # after echo cancellation: what the model hears
    output_db: float = SILENCE_DB
    voice: bool | None = None  # the user seems to be talking; None: no voice detector (a file)
    aec: bool = False
    erle_db: float | None = None  # echo attenuation, once measurable
    echo_delay_ms: float | None = None  # speaker-to-microphone delay beyond the stream's own latency
    roundtrip_ms: float | None = None  # output plus input latency, from the stream timestamps
    lag_ms: float | None = None  # microphone capture to speaker, for what is playing now
    buffered_ms: float = 0.0  # queued for playback
    dropped_frames: float = 0.0  # playback audio dropped to bound the lag, in 80 ms frames
    underruns: int = 0
    skipped_input_frames: int = 0  # stale microphone frames the model never heard
    recording: str | None = None
    recording_error: str | None = None


class FarEndAligner:
    """Keeps what was sent to the speaker and says which of it was playing when each microphone
    sample was captured, from the DAC and ADC timestamps of the stream.

    Timestamps run wild for the first second or so (through PulseAudio the round trip they give
    falls from about 1 s to 0.3 s) and then wander by a millisecond or two while the sound itself
    stays put. So the offset is taken once they are steady (the medians of the older and the newer
    half of a window agree within ``steady_ms``), and changed only for a move of ``move_ms`` (a new
    device or server buffer); smaller moves are the echo canceller's delay search's business."""

    def __init__(self, history_s: float = 4.0, window: int = 24, steady_ms: float = 2.0, move_ms: float = 20.0):
        self._far = np.zeros(int(history_s * SAMPLE_RATE), np.float32)
        self._written = 0  # far samples so far; the ring holds the last len(_far)
        self._last_block: tuple[int, float] | None = None  # (first index, DAC time)
        self._steady, self._move = steady_ms * SAMPLE_RATE / 1000, move_ms * SAMPLE_RATE / 1000
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
        """Observe one capture block; True when the offset moved (the echo path changed)."""
        if self._last_block is None:
            return False
        far_index, dac_time = self._last_block
        self._observations.append(far_index - mic_index - (dac_time - adc_time) * SAMPLE_RATE)
        self.roundtrip_ms = (dac_time - adc_time) * 1000
        obs = list(self._observations)
        half = len(obs) // 2
        if len(obs) < self._observations.maxlen or abs(median(obs[:half]) - median(obs[half:])) > self._steady:
            return False
        estimate = round(median(obs))
        if self.offset is None or abs(estimate - self.offset) > self._move:
            moved = self.offset is not None
            self.offset = estimate
            return moved
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
        # Whole frames waiting for echo cancellation: (pcm, index, captured_at, available_at).
        self._captured: deque[tuple[np.ndarray, int, float, float]] = deque(maxlen=25)
        self._realign = False  # the aligner moved: the canceller must start over
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
        """Microphone samples whose first reached the ADC at adc_time, delivered at ``now``.
        Cheap: whole frames wait for ``process_captured``, so the device thread never stalls."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        with self.condition:
            if self.aligner.captured(self._mic_index, adc_time):
                self._realign = True
            self._adc_marks.append((self._mic_index, adc_time))
            self._mic_index += len(pcm)
            self._pending = np.concatenate([self._pending, pcm])
            while len(self._pending) >= FRAME_SIZE:
                frame, self._pending = self._pending[:FRAME_SIZE], self._pending[FRAME_SIZE:]
                if len(self._captured) == self._captured.maxlen:
                    self.skipped_input_frames += 1  # nobody processes them: keep memory bounded
                self._captured.append((frame, self._pending_start, self._adc_time(self._pending_start), now))
                self._pending_start += FRAME_SIZE
            self.condition.notify_all()

    @property
    def frames_to_process(self) -> int:
        return len(self._captured)

    def process_captured(self) -> int:
        """Echo-cancel the captured frames and make them readable; returns how many. Runs on its
        own thread with a device (the canceller is that thread's alone), after ``capture`` in tests."""
        done = 0
        while True:
            with self.condition:
                if not self._captured:
                    return done
                mic, index, captured_at, available_at = self._captured.popleft()
                far = self.aligner.reference(index, FRAME_SIZE)  # what was playing
                lead = self.aligner.reference(index + REFERENCE_LEAD, FRAME_SIZE)
                realign, self._realign = self._realign, False
            if self.canceller is not None:
                if realign:
                    self.canceller.realign()
                clean = self.canceller.process(mic, lead)
            else:
                clean = mic
            with self.condition:
                self._in_meter.update(clean, FRAME_SIZE / SAMPLE_RATE)
                self._vad.update(clean, FRAME_SIZE / SAMPLE_RATE)
                self._record(clean, far)
                self._frames.append(MicFrame(clean, captured_at, available_at))
                while len(self._frames) > 1 and available_at - self._frames[0].available_at > self._max_age:
                    self._frames.popleft()  # nobody is reading: keep memory bounded
                    self.skipped_input_frames += 1
                self.condition.notify_all()
            done += 1

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

    def clear(self) -> None:
        """A new conversation: drop queued playback and unread frames, and restart the counters."""
        with self.condition:
            self.jitter.reset()
            self._captured.clear()
            self._frames.clear()
            self.skipped_input_frames = 0

    # Recording and stats -----------------------------------------------------------------------

    def start_recording(self, path: str | Path) -> None:
        """Stereo WAV: left what the user said (after echo cancellation), right what was playing.
        A recording of a conversation is private: the file is readable by its owner only."""
        writer = WavWriter(path, SAMPLE_RATE, channels=2, mode=0o600)
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

    def _echo_delay_ms(self) -> float | None:
        delay = self.canceller.delay_ms if self.canceller else None
        return None if delay is None else delay - REFERENCE_LEAD * 1000 / SAMPLE_RATE

    def stats(self) -> AudioStats:
        with self.condition:
            lag = self.jitter.last_lag
            return AudioStats(
                input_db=self._in_meter.db,
                output_db=self._out_meter.db,
                voice=self._vad.active,
                aec=self.canceller is not None,
                erle_db=self.canceller.erle_db if self.canceller else None,
                echo_delay_ms=self._echo_delay_ms(),
                roundtrip_ms=self.aligner.roundtrip_ms,
                lag_ms=None if lag is None else lag * 1000,
                buffered_ms=self.jitter.buffered * 1000 / SAMPLE_RATE,
                dropped_frames=self.jitter.dropped_frames,
                underruns=self.jitter.underruns,
                skipped_input_frames=self.skipped_input_frames,
                recording=str(self._recorder.path) if self._recorder else None,
                recording_error=self.recording_error,
            )
