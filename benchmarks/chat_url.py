"""What `moshi chat --url` adds to a conversation's latency over loopback, against the same model in
the in-process engine (the engine process on this machine).

Both run the tiny chat checkpoint's runner (float32, one torch thread): once in an `EngineProcess`,
once behind `moshi serve` on 127.0.0.1 driven by `RemoteEngine`. Each gets the same frames at the
pace of live audio (one every 80 ms), and each frame's round trip is timed from `send_frame` to the
`Output` the session polls; frame 0 is left out (no step answers it). The difference of the medians
is what the remote path adds: Opus both ways, the websocket, the server's threads, and the wait for
a step's text.

    python benchmarks/chat_url.py            # 4 rounds of 5 s each, in turn
    python benchmarks/chat_url.py --quick    # 2 s: checks that the code runs
    python benchmarks/chat_url.py --json
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import run_command_line, summary  # noqa: E402

from audio import FRAME_S, FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from engine.interface import Failed, Output, Ready  # noqa: E402
from engine.options import ModelOptions  # noqa: E402
from engine.tiny import write_tiny_checkpoint  # noqa: E402


def _frames(seconds: float) -> list[np.ndarray]:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / SAMPLE_RATE) / k for k in range(1, 8))
    pcm = (0.1 * voice * (np.sin(2 * np.pi * 1.3 * t) > -0.2)).astype(np.float32)
    return list(pcm[:len(pcm) // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE))


def _take(events, outputs: list[Output]) -> bool:
    """Collect the answers among `events`; True when one says the engine is live."""
    for event in events:
        if isinstance(event, Failed):
            raise RuntimeError(event.reason)
        if isinstance(event, Output):
            outputs.append(event)
    return any(isinstance(event, Ready) for event in events)


def wait_ready(engine, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not _take(engine.poll(0.1), []):
        assert time.monotonic() < end, "the engine did not start"


def roundtrips(engine, frames: list[np.ndarray], timeout: float = 120.0) -> list[float]:
    """Drive a live `engine` as a live session does, a frame every 80 ms; each answer's round trip (ms)."""
    outputs: list[Output] = []
    next_at, sent = time.monotonic(), 0
    for frame in frames:
        while (left := next_at - time.monotonic()) > 0:
            _take(engine.poll(left), outputs)
        sent += engine.send_frame(frame)  # a busy machine's engine falls behind and refuses some, as live
        next_at += FRAME_S
    end = time.monotonic() + timeout
    while len(outputs) < sent:
        assert time.monotonic() < end, "not every frame was answered"
        _take(engine.poll(0.1), outputs)
    return [out.timings_ms["roundtrip"] for out in outputs if out.index > 0]


def _serve(folder: Path):
    """`moshi serve` on the folder, on a free port: (the process, its host:port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moshi_tui", "serve", "--hf-repo", str(folder), "--dtype", "float32",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in process.stderr:
        if "serving" in line:
            return process, f"127.0.0.1:{port}"
    raise RuntimeError(f"moshi serve did not start (exit status {process.wait()})")


def run(quick: bool) -> dict[str, dict[str, float]]:
    from engine.process import EngineProcess
    from engine.remote.chat import RemoteEngine
    from engine.remote.connect import Server
    from engine.wire import CHAT_PATH

    # Rounds of each in turn, so that a change in the machine's load falls on both.
    rounds, frames = (1, _frames(2.0)) if quick else (4, _frames(5.0))
    local, remote = [], []
    with tempfile.TemporaryDirectory(prefix="moshi-remote-") as root:
        folder = write_tiny_checkpoint(Path(root) / "chat", "chat", seed=0)
        os.environ["OMP_NUM_THREADS"] = "1"  # the engine process reads it when torch starts
        process, address = _serve(folder)
        try:
            with EngineProcess("chat", ModelOptions(hf_repo=str(folder), dtype="float32", user_stt="off")) as engine:
                wait_ready(engine)
                for _ in range(rounds):
                    local += roundtrips(engine, frames)
                    engine.reset()
                    with RemoteEngine(Server.from_options(address, CHAT_PATH)) as remote_engine:
                        wait_ready(remote_engine)
                        remote += roundtrips(remote_engine, frames)
        finally:
            process.terminate()
            process.wait(10)
    figure = summary(remote, local)
    figure["added_ms"] = round(figure["ours_ms"] - figure["reference_ms"], 2)
    figure["p95_added_ms"] = round(float(np.percentile(remote, 95) - np.percentile(local, 95)), 2)
    figure["load_1min"] = os.getloadavg()[0]  # the machine's load: figures under load mean little
    return {"chat_url_added_latency_ms": figure}


# What the table's reference column is, under it.
NOTE = ("ours: a frame's round trip through moshi serve on loopback; reference: the in-process "
        "engine (medians)")


def main() -> None:
    run_command_line(__doc__, "2 s of frames: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
