"""A live chat in the TUI through `--url`: the real session, microphone and speaker (a private
PulseAudio server whose null sink loops back to the microphone), `RemoteEngine`, and Kyutai's own
server on a tiny checkpoint. The screen names the server and shows the round trip; the server
killed mid-conversation ends the session with its one line and leaves the recording whole. And a
server that never greets is said to be busy."""

import asyncio
import json
import time

import numpy as np
import pytest
import soundfile as sf

from engine.options import ModelOptions
from engine.remote.chat import WAITING, RemoteEngine
from engine.remote.connect import Server
from engine.tiny import write_tiny_checkpoint
from engine import wire
from engine.wire import CHAT_PATH
from moshi_tui.app import MoshiApp
from moshi_tui.session import MicSource, Session, SessionOptions
from moshi_tui.widgets import LatencyPanel, StatusBar

from remote.servers import SpecServer, kyutai_server

pytest.importorskip("moshi.models.loaders")  # the reference package
pytestmark = pytest.mark.timeout(400)


def _session(address: str, tmp_path):
    server = Server.from_options(address, CHAT_PATH)
    options = SessionOptions("chat", ModelOptions(), input_device="pulse", output_device="pulse", server=server)
    source = MicSource(options)
    return Session(options, RemoteEngine(server), source, tmp_path / "rec"), server


async def _until(pilot, condition, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        await pilot.pause(0.1)


async def test_a_live_chat_through_kyutai_server_then_the_server_dies(pulse, tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "chat", "chat", seed=3)
    with kyutai_server(folder, tmp_path) as kyutai:
        session, server = _session(f"127.0.0.1:{kyutai.port}", tmp_path)
        app = MoshiApp(session, mode="chat")
        async with app.run_test(size=(100, 24)) as pilot:
            await _until(pilot, lambda: app.state in ("live", "lagging") or app.failure, 60)
            assert app.state in ("live", "lagging"), app.failure
            latency = app.query_one(LatencyPanel)
            await _until(pilot, lambda: len(latency.steps) >= 25, 60)  # 2 s of answers
            status = app.query_one(StatusBar)
            assert server.shown in str(status.render().columns[0]._cells[0])
            assert "round trip" in str(latency.render().renderables[0])
            assert latency.stats.roundtrip_ms > 0 and latency.steps[-1] == latency.stats.roundtrip_ms
            kyutai.process.kill()
            killed = time.monotonic()
            await _until(pilot, lambda: app.failure is not None, 20)
            assert app.failure == "the server closed the connection"
            assert time.monotonic() - killed < 5
            await pilot.pause(0.5)
    session.stop()
    assert session.failure is not None
    [folder] = session.folders
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["server"] == server.shown and events[-1]["event"] == "end"
    assert any(e["event"] == "failed" and e["reason"] == "the server closed the connection" for e in events)
    wav, rate = sf.read(folder / "audio.wav", dtype="float32")
    assert rate == 24000 and wav.shape[1] == 2 and len(wav) / rate >= 2
    assert np.abs(wav[:, 1]).max() > 0.001  # the server's voice was played and recorded


async def test_a_server_that_never_greets_is_shown_as_busy(pulse, tmp_path):
    async def busy(ws, request):
        await asyncio.sleep(30)

    spec = SpecServer(busy)
    address = await spec.start()
    try:
        session, server = _session(address, tmp_path)
        app = MoshiApp(session, mode="chat")
        async with app.run_test(size=(100, 24)) as pilot:
            status = app.query_one(StatusBar)
            await _until(pilot, lambda: status.detail == WAITING, 10)
            assert status.state == "loading" and status.detail == WAITING
            assert server.shown in str(status.render().columns[0]._cells[0])
            await pilot.press("q")
        session.stop()
    finally:
        await spec.stop()


async def test_the_model_a_server_names_is_shown(tmp_path):
    """Metadata after the handshake names the model: the status bar shows it beside the server."""
    from moshi_tui.session import FileSource

    from remote.servers import echo_steps

    async def named(ws, request):
        await ws.send_bytes(wire.HANDSHAKE_RUST)
        await ws.send_bytes(wire.message(wire.Kind.METADATA, b'{"model": "moshika-q8", "instance_name": "box"}'))
        await echo_steps(ws, lambda step, frame: [(wire.Kind.AUDIO, frame)])

    spec = SpecServer(named)
    address = await spec.start()
    sf.write(tmp_path / "me.wav", np.zeros(24000, np.float32), 24000)
    try:
        server = Server.from_options(address, CHAT_PATH)
        options = SessionOptions("chat", ModelOptions(), input_file=tmp_path / "me.wav", server=server, record=False)
        session = Session(options, RemoteEngine(server), FileSource(tmp_path / "me.wav", realtime=True), None)
        app = MoshiApp(session, mode="chat")
        async with app.run_test(size=(100, 24)) as pilot:
            status = app.query_one(StatusBar)
            await _until(pilot, lambda: status.info is not None and status.info.model == "moshika-q8", 20)
            assert str(status.render().columns[0]._cells[0]).strip() == f"moshi  moshika-q8 · {server.shown}"
            await pilot.press("q")
        session.stop()
    finally:
        await spec.stop()
