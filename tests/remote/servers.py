"""Real servers on loopback for the remote tests: Kyutai's `moshi.server` (the reference package) on a
tiny checkpoint, a relay that keeps every message passing through it, and a server written here to
the protocol's rules where a scenario needs one Kyutai's cannot play (one that says an error, a
MoshiVis one)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

from engine import wire
from serve.support import free_port, start_kyutai

@contextmanager
def kyutai_server(folder: Path, work: Path):
    """Kyutai's `python -m moshi.server` on the tiny chat checkpoint in `folder`, on CPU, without its
    web UI: the running `serve.support.Server`, stopped at the end."""
    server = start_kyutai(folder, work)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGINT)


async def serve_chat(handler) -> tuple[web.AppRunner, str]:
    """An aiohttp server on loopback with `handler` at /api/chat: its runner (to clean up) and host:port."""
    app = web.Application()
    app.router.add_get(wire.CHAT_PATH, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"127.0.0.1:{port}"


async def moshi_cli(*args, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Our CLI in a child process, while this loop serves: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moshi_tui", *map(str, args), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})))
    try:
        out, err = await asyncio.wait_for(process.communicate(), 300)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode()


class RecordingRelay:
    """A websocket relay to `upstream` (ws://host:port): every binary message, each way, passes
    unchanged and is kept, in order, with the query string the client sent. `text_delay_s`: each
    text piece to the client is held back that long (what follows it waits behind it)."""

    def __init__(self, upstream: str, text_delay_s: float = 0.0) -> None:
        self.upstream = upstream
        self.text_delay_s = text_delay_s
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.query = ""

    async def _relay(self, request: web.Request) -> web.WebSocketResponse:
        self.query = request.query_string
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.upstream}{request.path_qs}", max_msg_size=0) as server:
                async def down():
                    async for msg in server:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            self.to_client.append(msg.data)
                            if msg.data[:1] == bytes([wire.Kind.TEXT]):
                                await asyncio.sleep(self.text_delay_s)
                            await client.send_bytes(msg.data)
                    await client.close()

                downstream = asyncio.create_task(down())
                async for msg in client:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self.to_server.append(msg.data)
                        await server.send_bytes(msg.data)
                await server.close()
                await downstream
        return client

    async def start(self) -> str:
        """Serve; the relay's address as host:port."""
        self._runner, address = await serve_chat(self._relay)
        return address

    async def stop(self) -> None:
        await self._runner.cleanup()

    def sent(self, kind: wire.Kind, direction: list[bytes]) -> list[bytes]:
        return [payload for kind_, payload in filter(None, map(wire.parse, direction)) if kind_ == kind]


def decode_opus(payloads: list[bytes]) -> np.ndarray:
    """One direction's audio messages, concatenated, decoded as the reference server decodes them."""
    import sphn

    reader = sphn.OpusStreamReader(24000)
    return np.concatenate([reader.append_bytes(p) for p in payloads] or [np.zeros(0, np.float32)])


def spectrogram_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 480) -> float:
    """How alike two sounds are as heard (magnitude spectra of 80 ms frames), at the codec's delay
    that aligns them best."""
    def spectra(pcm: np.ndarray) -> np.ndarray:
        frames = pcm[:len(pcm) // 1920 * 1920].reshape(-1, 1920)
        return np.abs(np.fft.rfft(frames * np.hanning(1920), axis=1)).ravel()

    best = -1.0
    for lag in range(0, max_lag, 10):
        n = min(len(reference), len(decoded) - lag) // 1920 * 1920
        best = max(best, float(np.corrcoef(spectra(reference[:n]), spectra(decoded[lag:lag + n]))[0, 1]))
    return best


class SpecServer:
    """A server written to the protocol's rules: `script(ws, request)` plays one connection. The
    helpers below are the pieces a script is made of."""

    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0

    async def _chat(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await self.script(ws, request)
        await ws.close()
        return ws

    async def start(self) -> str:
        self._runner, address = await serve_chat(self._chat)
        return address

    async def stop(self) -> None:
        await self._runner.cleanup()


async def echo_steps(ws, reply, first_step: int = 0, step_s: float = 0.0):
    """Step once per 1920 samples received, as Kyutai's servers do: no answer to the first step, then
    for step s `reply(s, frame)`: the messages to send, e.g. the frame heard (as voice) and a text.
    Each step takes `step_s` (a server slower than real time)."""
    import sphn

    from engine.stt.transcription import Framer

    reader, writer, framer, step = sphn.OpusStreamReader(24000), sphn.OpusStreamWriter(24000), Framer(), first_step
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY or msg.data[:1] != bytes([wire.Kind.AUDIO]):
            continue
        for frame in framer.push(reader.append_bytes(msg.data[1:])):
            await asyncio.sleep(step_s)
            if step > 0:
                for kind, payload in reply(step, frame):
                    if kind == wire.Kind.AUDIO:
                        payload = writer.append_pcm(payload)
                    await ws.send_bytes(wire.message(kind, payload))
            step += 1
