"""Sound devices through PortAudio (sounddevice): listing, choosing, and a loopback check.

PortAudio lists devices once, when it initialises, and skips what it cannot open: a sound server
started later (or a device plugged in later) is seen only after ``refresh()``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from .errors import DeviceError

HINT = "run `moshi devices` to see them"


def portaudio():
    """The sounddevice module, or a DeviceError if PortAudio itself is missing."""
    # Through PulseAudio's ALSA plugin, PortAudio's output underflows in its first callbacks
    # without this, and spins at 100 % CPU with 60 ms (measured: 400 ms gave 21 clean runs of 21,
    # 160 ms 8 of 10). 400 ms is what the server buffers, not what we wait.
    os.environ.setdefault("PULSE_LATENCY_MSEC", "400")
    try:
        import sounddevice
    except OSError as exc:
        raise DeviceError("the PortAudio library is missing (Debian/Ubuntu: apt install libportaudio2)") from exc
    return sounddevice


def refresh() -> None:
    """Make PortAudio list devices again (a server or device that appeared since start)."""
    sd = portaudio()
    sd._terminate()
    sd._initialize()


@dataclass
class Device:
    index: int
    name: str
    host_api: str
    inputs: int  # channels
    outputs: int
    rate: int  # the device's own sample rate
    default_input: bool
    default_output: bool

    def describe(self) -> str:
        return f"#{self.index} {self.name!r} ({self.host_api}, {self.rate} Hz)"


def list_devices() -> list[Device]:
    sd = portaudio()
    apis = sd.query_hostapis()
    default_in, default_out = _defaults(sd)
    return [
        Device(i, d["name"], apis[d["hostapi"]]["name"], d["max_input_channels"], d["max_output_channels"],
               int(d["default_samplerate"]), i == default_in, i == default_out)
        for i, d in enumerate(sd.query_devices())
    ]


def _defaults(sd) -> tuple[int, int]:
    try:
        return tuple(int(i) for i in sd.default.device)
    except (TypeError, ValueError):
        return -1, -1


def find_device(spec: str | int | None, kind: str) -> Device:
    """``kind`` is "input" or "output". ``spec``: None (the default), an index, or part of a name."""
    devices = list_devices()
    usable = [d for d in devices if (d.inputs if kind == "input" else d.outputs) > 0]
    if not usable:
        raise DeviceError(f"no audio {kind} device found: is a sound server running, or a sound card present? "
                          f"({HINT})")
    if spec is None or spec == "":
        default = next((d for d in usable if (d.default_input if kind == "input" else d.default_output)), None)
        return default or usable[0]
    if isinstance(spec, int) or str(spec).isdigit():
        index = int(spec)
        match = next((d for d in devices if d.index == index), None)
        if match is None:
            raise DeviceError(f"there is no audio device #{index} ({HINT})")
        if match not in usable:
            raise DeviceError(f"audio device #{index} ({match.name}) has no {kind} channels ({HINT})")
        return match
    wanted = str(spec).lower()
    matches = [d for d in usable if wanted in d.name.lower()]
    exact = [d for d in matches if d.name.lower() == wanted]
    if len(exact) == 1 or len(matches) == 1:
        return (exact or matches)[0]
    if not matches:
        names = ", ".join(repr(d.name) for d in usable)
        raise DeviceError(f"no audio {kind} device matches {spec!r}; there are: {names}")
    names = ", ".join(f"#{d.index} {d.name!r}" for d in matches)
    raise DeviceError(f"{spec!r} matches several {kind} devices ({names}); give an index or a longer name")


def open_error(exc: Exception, input: Device | None, output: Device | None) -> DeviceError:
    names = " and ".join(f"{d.name!r}" for d in dict.fromkeys(x for x in (input, output) if x))
    return DeviceError(f"cannot open audio device {names}: {exc}. It may be busy in another program or gone; "
                       f"choose another with --input-device/--output-device ({HINT})")


@dataclass
class LoopbackResult:
    input: Device
    output: Device
    rate: int
    heard_db: float  # level of the test tone as the input heard it (dBFS)
    tone_hz: float | None  # the strongest frequency heard during the tone
    delay_ms: float | None  # speaker to microphone, from the chirp; None if not heard
    reported_ms: float  # output + input latency, from the stream timestamps when the chirp came back
    glitches: int  # PortAudio over- or underflows


TONE_HZ = 1000.0


def loopback_test(input: str | int | None = None, output: str | int | None = None, latency: float = 0.15,
                  timeout_s: float = 15.0) -> LoopbackResult:
    """Play a chirp and a 1 s tone on the output and record the input meanwhile."""
    sd = portaudio()
    dev_in, dev_out = find_device(input, "input"), find_device(output, "output")
    rate = dev_out.rate
    signal, chirp, chirp_at, tone_at = _test_signal(rate)
    block = rate // 50
    recorded, stamps, position, glitches = [], [], [0], [0]
    done = threading.Event()

    def callback(indata, outdata, frames, time, status):
        if status.input_overflow or status.output_underflow:
            glitches[0] += 1
        start = position[0]
        chunk = signal[start:start + frames]
        outdata[:] = 0
        outdata[:len(chunk)] = chunk[:, None]
        position[0] += frames
        recorded.append(indata[:, 0].copy())
        stamps.append(time.outputBufferDacTime - time.inputBufferAdcTime)
        if position[0] >= len(signal):
            raise sd.CallbackStop

    try:
        stream = sd.Stream(device=(dev_in.index, dev_out.index), samplerate=rate, blocksize=block,
                           channels=(1, 1), dtype="float32", latency=latency, callback=callback,
                           finished_callback=done.set)
    except (sd.PortAudioError, ValueError) as exc:
        raise open_error(exc, dev_in, dev_out) from exc
    with stream:
        if not done.wait(timeout_s):
            raise DeviceError(f"the loopback test did not finish within {timeout_s:.0f} s: "
                              f"{dev_out.name!r} or {dev_in.name!r} stopped")
    heard = np.concatenate(recorded)
    corr = np.correlate(heard, chirp, "valid")
    lag = int(np.argmax(np.abs(corr)))
    noise = np.sqrt(np.mean(heard[rate:rate + rate // 5] ** 2)) + 1e-9  # before anything came back
    found = np.abs(corr[lag]) / np.sqrt(np.sum(chirp**2)) > 20 * noise  # well above the background
    delay = lag - chirp_at if found else None
    tone = heard[tone_at + (delay or 0): tone_at + (delay or 0) + rate]
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone))))
    peak = float(np.fft.rfftfreq(len(tone), 1 / rate)[int(np.argmax(spectrum))]) if len(tone) else None
    # What the timestamps said when the chirp came back (they are wild at first, then wander).
    at_chirp = min(len(stamps) - 1, (chirp_at + (delay or 0)) // block)
    return LoopbackResult(
        input=dev_in, output=dev_out, rate=rate,
        heard_db=float(10 * np.log10(np.mean(tone**2) + 1e-12)) if len(tone) else -120.0,
        tone_hz=peak, delay_ms=None if delay is None else delay * 1000 / rate,
        reported_ms=float(np.median(stamps[max(0, at_chirp - 2):at_chirp + 3])) * 1000, glitches=glitches[0])


def _test_signal(rate: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """2 s silence (the stream's timestamps settle meanwhile), a 20 ms chirp (300 Hz to 6 kHz),
    0.1 s silence, 1 s tone, 1 s silence. Returns the signal, the chirp, and where the chirp and
    the tone start."""
    t = np.arange(int(0.02 * rate)) / rate
    chirp = 0.5 * np.sin(2 * np.pi * (300 * t + (6000 - 300) / (2 * 0.02) * t**2))
    tone = 0.25 * np.sin(2 * np.pi * TONE_HZ * np.arange(rate) / rate)
    lead = 2 * rate
    gap = rate // 10
    signal = np.concatenate([np.zeros(lead), chirp, np.zeros(gap), tone, np.zeros(rate)]).astype(np.float32)
    return signal, chirp.astype(np.float32), lead, lead + len(chirp) + gap
