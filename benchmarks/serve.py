"""`moshi serve` with STT: how many streams it keeps in real time, and how late their words come.

For N = 1, 2, 4 and 8 streams: a ``moshi serve --quantize int8 --batch-size N`` subprocess on a
checkpoint at STT-1B's shapes (random weights, Mimi with 32 codebooks; Mimi in a process of its
own, one torch thread each), and N clients on loopback, each sending 24 kHz audio at real time
(one 80 ms frame every 80 ms), as a microphone would. Per N:

- ``serve_stt_rtf_N``: the server's mean batched step time (from its /metrics) over 80 ms: at 1
  or below it keeps up with N real-time streams;
- ``serve_stt_p95_word_latency_ms_N``: for each word, when it arrived minus when the audio up to
  its end was sent, 95th percentile over all streams; this includes the model's own text delay
  (0.5 s for STT-1B);
- ``serve_stt_streams_realtime``: the largest N whose real-time factor is at most 1.

The same with ``--quantize int4`` has the suffix ``_int4`` (``serve_stt_rtf_4_int4``, ...).

There is no reference column: Kyutai ships no Python STT server (their Rust one needs a GPU build).

    python benchmarks/serve.py            # 20 s of audio per stream
    python benchmarks/serve.py --quick    # 2 s, a 2-layer LM, N = 1 and 2: checks that the code runs
    python benchmarks/serve.py --json
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from common import run_command_line  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from pipeline import FRAME, RATE, speechlike, write_checkpoint  # noqa: E402

from engine.moshi.model import LMConfig  # noqa: E402

FRAME_S = FRAME / RATE
WARM_SECONDS = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, streams: int, port: int, quantize: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "moshi_tui", "serve", "--hf-repo", str(folder), "--quantize", quantize,
                               "--batch-size", str(streams), "--port", str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "serving" in line:
            return server
    raise RuntimeError(f"moshi serve did not start (exit {server.wait()})")


async def _stream(url: str, pcm: np.ndarray, latencies: list[float]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            begun = time.monotonic()

            async def send():
                for i, start in enumerate(range(0, len(pcm), FRAME)):
                    await asyncio.sleep(max(0.0, begun + i * FRAME_S - time.monotonic()))
                    await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": pcm[start:start + FRAME].tolist()},
                                                      use_single_float=True))
                await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 0}))
                for i in range(40):  # the flush: silence, faster than real time
                    await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * FRAME}, use_single_float=True))
                    await asyncio.sleep(FRAME_S / 4)

            sender = asyncio.create_task(send())
            async for message in ws:
                data = msgpack.unpackb(message.data)
                if data["type"] == "EndWord":
                    # The audio up to the word's end was sent at begun + stop_time (real-time pacing).
                    latencies.append(time.monotonic() - begun - data["stop_time"])
                elif data["type"] in ("Marker", "Error"):
                    break
            sender.cancel()


def _step_seconds(port: int) -> tuple[float, float]:
    """The server's (total step time, steps) so far, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = float(re.search(r"^moshi_step_seconds_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^moshi_step_seconds_count (\S+)$", text, re.M).group(1))
    return total, count


def wordy(folder: Path) -> None:
    """Random weights rarely pick padding (3) or end of padding (0), so words would never end;
    scaling those rows of the text head makes them common, as in real transcripts."""
    state = load_file(folder / "model.safetensors")
    state["text_linear.weight"][3] *= 3.0
    state["text_linear.weight"][0] *= 2.5
    save_file(state, folder / "model.safetensors")


def measure_streams(folder: Path, streams: int, seconds: float, quantize: str) -> tuple[float, float]:
    """(real-time factor, p95 word latency in ms) of `streams` real-time streams."""
    port = _free_port()
    server = _start_server(folder, streams, port, quantize)
    try:
        pcm = speechlike(seconds).numpy()
        latencies: list[float] = []

        async def all_streams():
            streaming = asyncio.gather(*(_stream(f"ws://127.0.0.1:{port}/api/asr-streaming", np.roll(pcm, 9600 * i),
                                                 latencies) for i in range(streams)))
            await asyncio.sleep(WARM_SECONDS)  # the first steps (allocations, a slot's first reset) are not the rate
            warm = await asyncio.to_thread(_step_seconds, port)
            await streaming
            return warm

        (warm_total, warm_count) = asyncio.run(all_streams())
        total, count = _step_seconds(port)
        rtf = (total - warm_total) / (count - warm_count) / FRAME_S
    finally:
        server.terminate()
        server.wait(timeout=30)
    p95 = float(np.percentile(latencies, 95)) * 1000 if latencies else float("nan")
    return rtf, p95


def run(quick: bool) -> dict[str, dict[str, float]]:
    seconds, counts = (2.0, (1, 2)) if quick else (20.0, (1, 2, 4, 8))
    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="moshi-serve-") as root:
        folder = write_checkpoint(Path(root) / "stt", cfg)
        wordy(folder)
        for quantize, suffix in (("int8", ""), ("int4", "_int4")):
            kept = 0
            for n in counts:
                rtf, p95 = measure_streams(folder, n, seconds, quantize)
                figures[f"serve_stt_rtf_{n}{suffix}"] = {"ours_rtf": round(rtf, 3)}
                figures[f"serve_stt_p95_word_latency_ms_{n}{suffix}"] = {"ours_ms": round(p95, 1)}
                if rtf <= 1:
                    kept = n
            figures[f"serve_stt_streams_realtime{suffix}"] = {"ours_streams": kept}
    return figures


# What the table's reference column is, under it.
NOTE = ("moshi serve's figures have ours only: Kyutai has no Python STT server to compare with")


def main() -> None:
    run_command_line(__doc__, "2 s, small LM, 1 and 2 streams: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
