"""The two sides of `/api/chat` on loopback: our `moshi serve`, Kyutai's `python -m moshi.server`
(the reference package), and a client that speaks as Kyutai's `moshi.client` does (aiohttp and
sphn: one Ogg/Opus stream each way, 1920-sample blocks, text pieces as they come)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import sphn

from engine import wire

SAMPLE_RATE, FRAME = 24_000, 1920
AFTER_LAST_S = 0.5  # the last text piece follows the last frame of voice at once
STARTUP_S = 120  # loading a tiny model on a loaded 2-core machine
# Kyutai's server, run on a CPU-only torch: its warm-up ends with torch.cuda.synchronize(), which
# such a build refuses; nothing else of it touches CUDA on --device cpu.
KYUTAI_SERVER = ("import sys, torch; torch.cuda.synchronize = lambda *a, **k: None; "
                 "sys.argv[0] = 'moshi.server'; import moshi.server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(folder: Path) -> Path:
    """Make the checkpoint's own sampling settings greedy, which both servers read."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["lm_gen_config"] = {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 25}
    path.write_text(json.dumps(config))
    return folder


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1", "NO_CUDA_GRAPH": "1",
            "PYTHONUNBUFFERED": "1"}


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    scheme: str = "ws"

    def url(self, query: str = "") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{wire.CHAT_PATH}" + (f"?{query}" if query else "")

    def http(self, path: str) -> str:
        return f"{'https' if self.scheme == 'wss' else 'http'}://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _wait_listening(server: Server) -> Server:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server ended ({server.process.returncode}):\n{server.output()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"the server did not listen in {STARTUP_S} s:\n{server.output()[-3000:]}")


def start_ours(folder: Path, tmp: Path, *args: str, extra_env: dict | None = None) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "moshi_tui", "serve", "--hf-repo", str(folder),
                                "--port", str(port), *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**env(), **(extra_env or {})})
    scheme = "wss" if "--ssl" in args else "ws"
    return _wait_listening(Server(process, port, log, scheme))


def start_kyutai(folder: Path, tmp: Path) -> Server:
    """Kyutai's server on the same files; its config names Mimi's config as a local file."""
    config = json.loads((folder / "config.json").read_text())
    config["mimi_config_name"] = f"file://{folder / config['mimi_config_name']}"
    config_path = tmp / "kyutai-config.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    log = tmp / f"kyutai-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-c", KYUTAI_SERVER, "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
         "--static", "none", "--hf-repo", "kyutai/unused", "--config-path", str(config_path),
         "--moshi-weight", str(folder / config["moshi_name"]), "--mimi-weight", str(folder / config["mimi_name"]),
         "--tokenizer", str(folder / config["tokenizer_name"])],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env(), "HF_HUB_OFFLINE": "1"}, cwd=tmp)
    return _wait_listening(Server(process, port, log))


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voice-like audio: a few gliding harmonics under a syllable envelope, and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120 + 40 * np.sin(2 * np.pi * (0.5 + seed * 0.1) * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + seed * 0.3) * t) ** 2
    return (0.2 * voice * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@dataclass
class Heard:
    texts: list[str] = field(default_factory=list)
    colours: list[int] = field(default_factory=list)
    samples: int = 0
    errors: list[str] = field(default_factory=list)
    handshake: bytes | None = None
    closed: bool = False


async def talk(url: str, pcm: np.ndarray, picture: bytes | None = None, quiet: float = 3.0,
               headers: dict | None = None, ssl=True, leave_after: int | None = None,
               session: aiohttp.ClientSession | None = None, pace: float = 0.0) -> Heard:
    """As Kyutai's `moshi.client`: connect, (MoshiVis: send the picture), wait for the handshake, then
    send the audio in 1920-sample blocks through one Opus stream, and collect what comes back until
    the server has been quiet for `quiet` s after the last block (or, with `leave_after`, hang up
    once that many blocks are sent). `pace`: seconds between blocks (0: as fast as it goes)."""
    heard = Heard()
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.ws_connect(url, headers=headers, ssl=ssl, max_msg_size=0) as ws:
            if picture is not None:
                await ws.send_bytes(wire.message(wire.Kind.IMAGE, picture))
            first = await ws.receive(timeout=60)
            if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != bytes([wire.Kind.HANDSHAKE]):
                if first.type == aiohttp.WSMsgType.BINARY and first.data[:1] == bytes([wire.Kind.ERROR]):
                    heard.errors.append(first.data[1:].decode())
                heard.closed = True
                return heard
            heard.handshake = first.data
            reader, writer = sphn.OpusStreamReader(SAMPLE_RATE), sphn.OpusStreamWriter(SAMPLE_RATE)

            async def send() -> None:
                for index, start in enumerate(range(0, len(pcm) - FRAME + 1, FRAME)):
                    if leave_after is not None and index == leave_after:
                        await ws.close()
                        return
                    data = writer.append_pcm(pcm[start:start + FRAME])
                    if data:
                        await ws.send_bytes(wire.message(wire.Kind.AUDIO, data))
                    await asyncio.sleep(pace)

            sender = asyncio.create_task(send())
            # A server answers every block but the first with a frame of voice; then its text follows.
            answered = (len(pcm) // FRAME - 1) * FRAME
            while True:
                wait = AFTER_LAST_S if heard.samples >= answered else quiet if sender.done() else 120
                try:
                    message = await ws.receive(timeout=wait)
                except asyncio.TimeoutError:
                    break
                if message.type != aiohttp.WSMsgType.BINARY:
                    heard.closed = True
                    break
                kind, payload = wire.parse(message.data)
                if kind is wire.Kind.AUDIO:
                    heard.samples += reader.append_bytes(payload).shape[-1]
                elif kind is wire.Kind.TEXT:
                    heard.texts.append(payload.decode())
                elif kind is wire.Kind.COLORED_TEXT:
                    colour, text = wire.parse_colored_text(payload)
                    heard.colours.append(colour)
                    heard.texts.append(text)
                elif kind is wire.Kind.ERROR:
                    heard.errors.append(payload.decode())
            await sender
    finally:
        if own:
            await session.close()
    return heard
