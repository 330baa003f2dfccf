"""Echo-cancellation benchmark on a reproducible echo scene built from espeak-ng speech.

Scene (24 kHz, int16): the far end (Moshi) talks for about 30 s; its
echo reaches the microphone after a pure delay of 40, 80 or 120 ms through a room impulse response
(direct tap plus exponentially decaying noise, T60 150 ms) at -6 dB; white noise at -70 dBFS.
The near talker speaks over the far end from 16 s (double talk), and alone after the far end stops.

Metrics, on 80 ms windows:
  ERLE = 10 log10(sum mic^2 / sum out^2) over windows where the echo is above -50 dBFS and the near
  talker is silent: in the first second (erle_0_1s), from 1 to 3 s (erle_1_3s), and from 3 s to the
  start of double talk (erle_converged); erle_after_dt is measured after the double talk.
  dt_sdr: SDR of the output against the clean near speech during double talk, after a 128-tap
  least-squares fit (BSS-eval style: a gain or phase change is not an error; echo and damage are).
  near_sdr: the same when the near talker is alone.

    python benchmarks/aec.py                  # table for 40, 80 and 120 ms
    python benchmarks/aec.py --json           # one JSON object per scene
    python benchmarks/aec.py --quick --json   # shorter scene (used by the test suite)
    python benchmarks/aec.py --plain-speex    # the baseline: speex alone, 480-sample frames, 256 ms filter
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio import SAMPLE_RATE  # noqa: E402
from audio.files import read_audio  # noqa: E402

FAR_TEXT = (
    "Good morning. Today will be mostly sunny with a high of twenty three degrees and a light breeze from "
    "the west. In the afternoon, clouds will build up over the hills, and there is a thirty percent chance "
    "of a short shower after five. Tomorrow looks cooler, with rain in the morning and clearing skies by "
    "noon. On your calendar today you have a team meeting at ten, lunch with Sarah at half past twelve, "
    "and a dentist appointment at four fifteen. Remember to pick up the parcel from the post office "
    "before it closes at six."
)
NEAR_TEXT = "Hey, wait a second, can you move the dentist to Friday and remind me about the parcel at five?"
QUICK_FAR_TEXT = FAR_TEXT.split(" Tomorrow")[0]
DT_START_S = 16.0
QUICK_DT_START_S = 8.0
WINDOW = SAMPLE_RATE * 80 // 1000
BLOCK = 1920  # the canceller works on the model's 80 ms frames


@dataclass
class Scene:
    delay_ms: int
    far: np.ndarray  # what the speaker plays (float, int16-quantised)
    mic: np.ndarray  # echo + near + noise
    echo: np.ndarray  # the echo component alone
    near: np.ndarray  # the near component alone (aligned with mic)
    dt: slice  # double talk
    near_alone: slice
    dt_start: int


def speak(text: str, voice: str, wpm: int, folder: Path) -> np.ndarray:
    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is needed to build the echo scene (Debian: apt install espeak-ng)")
    path = folder / f"{voice.replace('+', '_')}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
    return read_audio(path)


def room_response(seed: int = 0, t60_s: float = 0.150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(t60_s * SAMPLE_RATE)
    tail = rng.standard_normal(n) * np.exp(-6.908 * np.arange(n) / n)
    tail[0] = 0.0
    tail *= np.sqrt(0.5 / np.sum(tail**2))  # reverberant energy 3 dB below the direct sound
    tail[0] = 1.0
    return tail


def quantise(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1) * 32767) / 32767


def make_scene(delay_ms: int, far_speech: np.ndarray, near_speech: np.ndarray, dt_start_s: float) -> Scene:
    far = far_speech * (10 ** (-3 / 20) / np.abs(far_speech).max())
    near = near_speech * (10 ** (-9 / 20) / np.abs(near_speech).max())
    dt_start = int(dt_start_s * SAMPLE_RATE)
    alone_start = len(far) + SAMPLE_RATE
    total = alone_start + len(near) + SAMPLE_RATE // 2
    far = quantise(np.pad(far, (0, total - len(far))))
    delay = delay_ms * SAMPLE_RATE // 1000
    echo = np.convolve(far, room_response())[: total]
    echo = np.pad(echo, (delay, 0))[:total]
    echo *= np.sqrt(10 ** (-6 / 10) * np.sum(far**2) / np.sum(echo**2))
    near_track = np.zeros(total)
    near_track[dt_start:dt_start + len(near)] = near
    near_track[alone_start:alone_start + len(near)] = near
    noise = np.random.default_rng(1).standard_normal(total) * 10 ** (-70 / 20)
    mic = quantise(echo + near_track + noise)
    return Scene(delay_ms, far, mic, echo, near_track, slice(dt_start, dt_start + len(near)),
                 slice(alone_start, alone_start + len(near)), dt_start)


def run_canceller(process, scene: Scene) -> tuple[np.ndarray, float]:
    """Feed the scene block by block; returns the output and the CPU time share of real time."""
    out = np.zeros_like(scene.mic)
    start = time.process_time()
    for i in range(0, len(scene.mic) - BLOCK + 1, BLOCK):
        out[i:i + BLOCK] = process(scene.mic[i:i + BLOCK].astype(np.float32), scene.far[i:i + BLOCK].astype(np.float32))
    cpu = (time.process_time() - start) / (len(scene.mic) / SAMPLE_RATE)
    return out, cpu


def output_latency(scene: Scene, out: np.ndarray) -> int:
    """Samples the canceller delays its output by, from the near-alone part (0..100 ms)."""
    ref, got = scene.mic[scene.near_alone], out[scene.near_alone]
    lags = range(0, SAMPLE_RATE // 10)
    scores = [np.dot(ref[: len(ref) - lag], got[lag:]) for lag in lags]
    return int(np.argmax(scores))


def erle_db(scene: Scene, out: np.ndarray, start_s: float, end_s: float) -> float:
    num = den = 0.0
    for w in range(int(start_s * SAMPLE_RATE) // WINDOW, int(end_s * SAMPLE_RATE) // WINDOW):
        s = slice(w * WINDOW, (w + 1) * WINDOW)
        echo_dbfs = 10 * np.log10(np.mean(scene.echo[s] ** 2) + 1e-20)
        near_dbfs = 10 * np.log10(np.mean(scene.near[s] ** 2) + 1e-20)
        if echo_dbfs > -50 and near_dbfs < -80:
            num += np.sum(scene.mic[s] ** 2)
            den += np.sum(out[s] ** 2)
    return float(10 * np.log10(num / max(den, 1e-20))) if num else None


def sdr_db(reference: np.ndarray, estimate: np.ndarray, taps: int = 128) -> float:
    """SDR after the best FIR (taps) mapping of the reference onto the estimate (normal equations)."""
    n = len(reference)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    ref_f, est_f = np.fft.rfft(reference, size), np.fft.rfft(estimate, size)
    auto = np.fft.irfft(ref_f * np.conj(ref_f), size)[:taps]
    cross = np.fft.irfft(est_f * np.conj(ref_f), size)[:taps]
    toeplitz = auto[np.abs(np.arange(taps)[:, None] - np.arange(taps)[None, :])]
    coef = np.linalg.solve(toeplitz, cross)
    target = np.convolve(reference, coef)[:n]
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def evaluate(scene: Scene, out: np.ndarray, cpu: float) -> dict:
    lat = output_latency(scene, out)
    aligned = np.concatenate([out[lat:], np.zeros(lat)])
    far_end = len(np.trim_zeros(scene.far, "b")) / SAMPLE_RATE
    dt_s = scene.dt_start / SAMPLE_RATE
    dt_end_s = scene.dt.stop / SAMPLE_RATE
    return {
        "delay_ms": scene.delay_ms,
        "erle_0_1s": _round(erle_db(scene, aligned, 0, 1)),
        "erle_1_3s": _round(erle_db(scene, aligned, 1, 3)),
        "erle_converged": _round(erle_db(scene, aligned, 3, dt_s)),
        "erle_after_dt": _round(erle_db(scene, aligned, dt_end_s, far_end)),
        "dt_sdr": round(sdr_db(scene.near[scene.dt], aligned[scene.dt]), 1),
        "dt_sdr_in": round(sdr_db(scene.near[scene.dt], scene.mic[scene.dt]), 1),
        "near_sdr": round(sdr_db(scene.near[scene.near_alone], aligned[scene.near_alone]), 1),
        "latency_ms": round(lat * 1000 / SAMPLE_RATE, 1),
        "cpu_percent": round(100 * cpu, 2),
    }


def plain_speex():
    from audio.speex import SpeexEcho

    speex = SpeexEcho(480, SAMPLE_RATE * 256 // 1000, SAMPLE_RATE)

    def process(mic, far):
        pcm = [speex.cancel(*(np.round(x[i:i + 480] * 32767).astype(np.int16) for x in (mic, far)))
               for i in range(0, len(mic), 480)]
        return np.concatenate(pcm) / 32767

    return process


def ours():
    from audio.aec import EchoCanceller

    return EchoCanceller().process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per scene")
    parser.add_argument("--quick", action="store_true", help="a shorter scene (double talk at 8 s)")
    parser.add_argument("--plain-speex", action="store_true", help="measure speex alone instead")
    parser.add_argument("--delays", default="40,80,120", help="echo delays in ms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        far = speak(QUICK_FAR_TEXT if args.quick else FAR_TEXT, "en-us", 165, Path(folder))
        near = speak(NEAR_TEXT, "en+f3", 150, Path(folder))
    rows = []
    for delay in (int(d) for d in args.delays.split(",")):
        scene = make_scene(delay, far, near, QUICK_DT_START_S if args.quick else DT_START_S)
        out, cpu = run_canceller(plain_speex() if args.plain_speex else ours(), scene)
        row = evaluate(scene, out, cpu)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        keys = list(rows[0])
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
