"""Full-duplex audio on a PortAudio device: the thin layer between sounddevice and DuplexCore.

The stream runs at the devices' own rate in 20 ms blocks; each callback converts the captured
block to 24 kHz for the core and the core's 24 kHz playback to the device rate. Everything else
(echo cancellation, buffering, lag bounding, meters, recording) happens in ``core.DuplexCore``.

    with DuplexAudio() as audio:
        while True:
            frame = audio.read(timeout=0.5)      # 1920 samples, echo-cancelled, never stale
            if frame is not None:
                audio.play(model.step(frame.pcm), frame.captured_at)
"""

from __future__ import annotations

import atexit
import threading
import time
from pathlib import Path

import numpy as np

from . import SAMPLE_RATE
from .core import AudioStats, DuplexConfig, DuplexCore, MicFrame
from .devices import find_device, open_error, portaudio
from .errors import DeviceError
from .resample import Resampler

BLOCK_S = 0.020
# PortAudio's suggested latency. Through PulseAudio's ALSA plugin, 0.1 s made the round trip
# drift by 1-2 ms/s in most runs (the server resizing its buffers), which no echo canceller can
# follow; from 0.15 s it held steady. Real cards may do with less: it is a parameter.
LATENCY_S = 0.15
# No callback for this long: the device is gone. Sound servers on a loaded machine (measured: load
# average 4 on 2 cores, PulseAudio) can pause callbacks for 2 s, which is no reason to stop.
SILENT_DEVICE_S = 5.0
STARTUP_S = 10.0  # the first callback may take a while (1.6 s through PulseAudio's ALSA plugin)
GONE = ": was a device unplugged, or did the sound server stop?"


def device_failure(now: float, started: float, last_callback: float | None, first_read: float | None) -> str | None:
    """Why the device counts as gone at ``now`` (monotonic seconds), or None.

    Silence counts from the later of the last callback and the reader's first read: a stream opened
    early (while a model loads) may get a first callback at once, then none for seconds while the
    sound server starts on a busy machine, and that is no reason to fail the first read.
    """
    if last_callback is None:
        return f"did not start within {STARTUP_S:.0f} s" if now - started > STARTUP_S else None
    if now - max(last_callback, first_read if first_read is not None else last_callback) > SILENT_DEVICE_S:
        return f"sent no audio for {SILENT_DEVICE_S:.0f} s"
    return None


class DuplexAudio:
    def __init__(self, input: str | int | None = None, output: str | int | None = None,
                 config: DuplexConfig | None = None, latency_s: float = LATENCY_S):
        sd = self._sd = portaudio()
        self.input, self.output = find_device(input, "input"), find_device(output, "output")
        self.core = DuplexCore(config)
        self.rate, self._channels = self._pick_format(sd)
        self._to_model, self._to_device = Resampler(self.rate, SAMPLE_RATE), Resampler(SAMPLE_RATE, self.rate)
        self._out = np.zeros(0, np.float32)  # device-rate samples converted but not yet played
        self._last_read: MicFrame | None = None
        self._failure: str | None = None
        self._last_callback: float | None = None  # monotonic time of the latest callback
        self._first_read: float | None = None  # monotonic time of the reader's first `read`
        self._stream_time_at_callback = 0.0  # the stream's clock then (see now())
        self._started_at = time.monotonic()
        self.glitches = 0  # PortAudio input overflows and output underflows
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._process, name="audio-aec", daemon=True)
        try:
            self._stream = sd.Stream(
                device=(self.input.index, self.output.index), samplerate=self.rate,
                blocksize=round(self.rate * BLOCK_S), channels=self._channels, dtype="float32",
                latency=latency_s, callback=self._callback, finished_callback=self._finished)
        except (sd.PortAudioError, ValueError) as exc:
            raise open_error(exc, self.input, self.output) from exc

    def _pick_format(self, sd) -> tuple[int, tuple[int, int]]:
        """One rate for both directions (a duplex stream has one): the output's own if the input
        can run at it too. Mono where the devices allow it, else stereo (some cards insist)."""
        for rate in dict.fromkeys((self.output.rate, self.input.rate, 48000, 44100, SAMPLE_RATE)):
            channels = (self._channels_at(sd.check_input_settings, self.input, rate),
                        self._channels_at(sd.check_output_settings, self.output, rate))
            if all(channels):
                return rate, channels
        raise DeviceError(f"{self.input.name!r} and {self.output.name!r} have no sample rate in common; "
                          "choose other devices with --input-device/--output-device")

    def _channels_at(self, check, device, rate: int) -> int | None:
        for channels in (1, 2):
            try:
                check(device.index, channels=channels, samplerate=rate)
                return channels
            except (self._sd.PortAudioError, ValueError):
                continue
        return None

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> DuplexAudio:
        self._started_at = time.monotonic()
        try:
            self._stream.start()
        except self._sd.PortAudioError as exc:
            raise open_error(exc, self.input, self.output) from exc
        self._worker.start()
        return self

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            with self.core.condition:
                self.core.condition.notify_all()
            if self._worker.is_alive():
                self._worker.join(5)
            # PortAudio can hang stopping a stream whose sound server died: do not wait for ever.
            closing = threading.Thread(target=self._close_stream, name="audio-close", daemon=True)
            closing.start()
            closing.join(2.0)
            if closing.is_alive():
                # PortAudio is wedged; its exit handler would hang the same way, so let the
                # process end without it (the system frees the device).
                atexit.unregister(self._sd._exit_handler)
            self.core.stop_recording()

    def _close_stream(self) -> None:
        try:
            self._stream.abort()
            self._stream.close()
        except self._sd.PortAudioError:
            pass  # the device is gone already

    def __enter__(self) -> DuplexAudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # The stream's callback ---------------------------------------------------------------------

    def _callback(self, indata, outdata, frames, stamps, status) -> None:
        try:
            self._stream_time_at_callback, self._last_callback = stamps.currentTime, time.monotonic()
            if status.input_overflow or status.output_underflow:
                self.glitches += 1
            adc, dac, now = self._times(stamps, frames)
            while len(self._out) < frames:
                dac_next = dac + len(self._out) / self.rate
                needed = max(1, round((frames - len(self._out)) * SAMPLE_RATE / self.rate))
                self._out = np.concatenate([self._out, self._to_device.process(self.core.playback(needed, dac_next))])
            outdata[:] = self._out[:frames, None]  # the same on every channel
            self._out = self._out[frames:]
            mic = indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1)
            self.core.capture(self._to_model.process(mic), adc, now)
        except Exception as exc:  # never let an error kill the audio thread silently
            self._failure = f"audio processing failed: {exc!r}"
            raise self._sd.CallbackAbort from exc

    def _times(self, stamps, frames: int) -> tuple[float, float, float]:
        now = stamps.currentTime
        adc, dac = stamps.inputBufferAdcTime, stamps.outputBufferDacTime
        if not adc or not dac:  # some host APIs give no timestamps: use the nominal latencies
            latency_in, latency_out = self._stream.latency
            adc, dac = now - frames / self.rate - latency_in, now + latency_out
        return adc, dac, now

    def _process(self) -> None:
        """Echo cancellation, off the audio thread: the device callback must stay short."""
        try:
            while not self._closed.is_set():
                if not self.core.process_captured():
                    with self.core.condition:
                        self.core.condition.wait_for(lambda: self.core.frames_to_process or self._closed.is_set(), 0.1)
        except Exception as exc:
            self._failure = f"audio processing failed: {exc!r}"

    def _finished(self) -> None:
        if not self._closed.is_set() and self._failure is None:
            self._failure = f"the audio stream stopped ({self._device_names()}){GONE}"

    # The model's side --------------------------------------------------------------------------

    def read(self, timeout: float | None = None) -> MicFrame | None:
        """The next microphone frame (None after ``timeout`` seconds). Raises DeviceError when the
        device has stopped: unplugged, or its sound server went away."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._first_read is None:
            self._first_read = time.monotonic()
        with self.core.condition:
            while True:
                self._check_alive()
                frame = self.core.read_frame(self.now())
                if frame is not None:
                    self._last_read = frame
                    return frame
                left = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                if left <= 0:
                    return None
                self.core.condition.wait(left)

    def play(self, pcm: np.ndarray, captured_at: float | None = None) -> None:
        """Queue 24 kHz model audio. ``captured_at``: that of the microphone frame it answers;
        by default the last one read (right for an engine that answers each frame as it comes)."""
        if captured_at is None and self._last_read is not None:
            captured_at = self._last_read.captured_at
        self.core.play(pcm, captured_at, self.now())

    def now(self) -> float:
        """The stream's clock, extrapolated from the latest callback: asking PortAudio from this
        thread can block for good once a sound server has died."""
        if self._last_callback is None:
            return 0.0
        return self._stream_time_at_callback + time.monotonic() - self._last_callback

    def clear(self) -> None:
        """A new conversation: forget queued playback and unread microphone frames."""
        self.core.clear()

    def stats(self) -> AudioStats:
        return self.core.stats()

    def start_recording(self, path: str | Path) -> None:
        self.core.start_recording(path)

    def stop_recording(self) -> None:
        self.core.stop_recording()

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise DeviceError(self._failure)
        if self._closed.is_set():
            raise DeviceError("the audio stream is closed")
        failure = device_failure(time.monotonic(), self._started_at, self._last_callback, self._first_read)
        if failure is not None:
            self._failure = f"{self._device_names()} {failure}{GONE}"
            self._check_alive()

    def _device_names(self) -> str:
        if self.input.index == self.output.index:
            return self.input.name
        return f"{self.input.name} / {self.output.name}"
