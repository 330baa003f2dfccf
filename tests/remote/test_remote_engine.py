"""`RemoteEngine` (engine/remote/chat.py) against servers written here to the protocol's rules, on
loopback: how the server's answers become one `Output` per frame (voice, text and colour on the
frame they answer), MoshiVis's picture first and
`xa_start` in the query, either handshake, metadata, errors, unknown kinds, a new conversation on a
new connection, and a server that never greets."""

import asyncio
import time

import numpy as np
import pytest

from audio import FRAME_SIZE
from audio.lag import MAX_IN_FLIGHT_FRAMES
from engine import wire
from engine.interface import Described, Failed, Loading, Output, Ready
from engine.remote import chat
from engine.remote.chat import WAITING, RemoteEngine, chat_query
from engine.remote.connect import Server
from engine.options import SeeOptions

from .servers import SpecServer, echo_steps

pytestmark = pytest.mark.timeout(120)
PICTURE = b"\x89PNG not really, the server only checks it came first"


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Frames of distinct tones, so that each answer can be told apart."""
    t = np.arange(FRAME_SIZE) / 24000
    return [(0.3 * np.sin(2 * np.pi * (200 + 40 * k) * t)).astype(np.float32) for k in range(seed, seed + n)]


async def _run(engine: RemoteEngine, frames: list[np.ndarray], timeout: float = 30.0) -> tuple[list, list]:
    """Drive the engine as the session does, from a thread: wait for Ready, send the frames as it
    takes them, collect what it says until every frame is answered or it fails."""
    def drive():
        events, outputs, pending, live = [], [], list(frames), False
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if live:
                while pending and engine.in_flight < engine.max_in_flight and engine.send_frame(pending[0]):
                    pending.pop(0)
            for event in engine.poll(0.02):
                events.append(event)
                live |= isinstance(event, Ready)
                if isinstance(event, Output):
                    outputs.append(event)
                if isinstance(event, Failed):
                    return events, outputs
            if live and not pending and len(outputs) == len(frames):
                return events, outputs
        raise AssertionError(f"not all answered in {timeout} s: {events}")

    try:
        return await asyncio.to_thread(drive)
    finally:
        engine.close()


def _tone_of(pcm: np.ndarray) -> int:
    """Which of `_frames`' tones a frame mostly is (through two Opus passes, a few ms late)."""
    peak_hz = np.argmax(np.abs(np.fft.rfft(pcm * np.hanning(FRAME_SIZE)))) * 24000 / FRAME_SIZE
    return round((peak_hz - 200) / 40)


async def test_moshivis_picture_first_and_coloured_words_on_their_frames():
    seen = {}

    async def moshivis(ws, request):
        seen["query"] = dict(request.query)
        first = await ws.receive_bytes()  # before any greeting: the picture
        seen["first"] = first
        await ws.send_bytes(wire.HANDSHAKE_RUST)

        def reply(step, frame):  # a step's voice, then its words, as Kyutai's servers send them
            return [(wire.Kind.AUDIO, frame), (wire.Kind.COLORED_TEXT, bytes([step % 11]) + f" w{step}".encode())]

        await echo_steps(ws, reply)

    server = SpecServer(moshivis)
    address = await server.start()
    frames = _frames(12)
    try:
        options = SeeOptions(image="p.png", temp_text=0.45, top_k=250)
        engine = RemoteEngine(Server.from_options(address, wire.CHAT_PATH), chat_query(options), PICTURE)
        events, outputs = await _run(engine, frames)
    finally:
        await server.stop()
    assert seen["first"] == wire.message(wire.Kind.IMAGE, PICTURE)
    assert seen["query"] == {"xa_start": "16", "text_temperature": "0.45", "audio_topk": "250"}
    assert [o.index for o in outputs] == list(range(12))
    assert outputs[0].pcm is None and outputs[0].text is None  # the server's first step says nothing
    for k, out in enumerate(outputs[1:], 1):
        assert _tone_of(out.pcm) == k  # the voice is the server's answer to frame k
        assert out.timings_ms["roundtrip"] > 0
    # Each step's words on its frame, or, when they came more than the grace after its voice (a busy
    # machine), on the next one: never earlier, never lost, in order, each with its colour.
    words = [(out.index, piece) for out in outputs if out.text for piece in out.text.split()]
    assert [w for _, w in words] == [f"w{k}" for k in range(1, 12)]
    assert all(index - int(w[1:]) in (0, 1) for index, w in words)
    assert sum(index == int(w[1:]) for index, w in words) > len(words) // 2
    for out in outputs:
        if out.text and len(out.text.split()) == 1:  # the colour the TUI shows is the server's
            assert wire.gate_colour(out.gate) == int(out.text.split()[0][1:]) % 11


async def test_metadata_names_the_model_and_unknown_kinds_are_discarded():
    async def server_script(ws, request):
        await ws.send_bytes(wire.HANDSHAKE_PYTHON)
        await ws.send_bytes(bytes([42]) + b"a kind from the future")
        await ws.send_bytes(wire.message(wire.Kind.METADATA, b'{"model": "moshiko-q8", "text_temperature": 0.7}'))
        await echo_steps(ws, lambda step, frame: [(wire.Kind.AUDIO, frame), (wire.Kind.TEXT, b" hi")])

    server = SpecServer(server_script)
    address = await server.start()
    try:
        events, outputs = await _run(RemoteEngine(Server.from_options(address, wire.CHAT_PATH)), _frames(5))
    finally:
        await server.stop()
    ready = next(e for e in events if isinstance(e, Ready))
    assert ready.info["server"] == f"ws://{address}/api/chat"
    described = [e for e in events if isinstance(e, Described)]
    assert described and described[-1].info["model"] == "moshiko-q8"
    assert "".join(o.text or "" for o in outputs) == " hi" * 4


@pytest.mark.parametrize("when", ["before the handshake", "mid-conversation"])
async def test_an_error_from_the_server_fails_the_engine_with_its_message(when):
    async def server_script(ws, request):
        if when == "mid-conversation":
            await ws.send_bytes(wire.HANDSHAKE_PYTHON)
            await ws.receive_bytes()
        await ws.send_bytes(wire.message(wire.Kind.ERROR, wire.NO_FREE_CHANNELS.encode()))

    server = SpecServer(server_script)
    address = await server.start()
    try:
        events, _ = await _run(RemoteEngine(Server.from_options(address, wire.CHAT_PATH)), _frames(20))
    finally:
        await server.stop()
    assert isinstance(events[-1], Failed) and events[-1].reason == f"the server says: {wire.NO_FREE_CHANNELS}"


async def test_a_server_that_never_greets_is_waited_for_and_said_so():
    async def busy(ws, request):
        await asyncio.sleep(8)  # a server whose one slot is taken

    server = SpecServer(busy)
    address = await server.start()
    engine = RemoteEngine(Server.from_options(address, wire.CHAT_PATH))
    try:
        def watch():
            seen, started = [], time.monotonic()
            while time.monotonic() - started < 5:
                seen += [(round(time.monotonic() - started, 1), e) for e in engine.poll(0.1)]
            return seen

        seen = await asyncio.to_thread(watch)
    finally:
        engine.close()
        await server.stop()
    notices = [(t, e.detail) for t, e in seen if isinstance(e, Loading)]
    assert notices[0][1].startswith("connecting to ")
    assert [d for _, d in notices[1:]] == [WAITING]
    assert 2.9 <= notices[1][0] < 4.5
    assert not any(isinstance(e, (Ready, Failed)) for _, e in seen)
    assert not engine.send_frame(_frames(1)[0])  # no audio before the greeting


async def test_reset_is_a_new_connection_and_frames_count_from_zero():
    async def server_script(ws, request):
        await ws.send_bytes(wire.HANDSHAKE_PYTHON)
        await echo_steps(ws, lambda step, frame: [(wire.Kind.AUDIO, frame), (wire.Kind.TEXT, f"c{server.connections}".encode())])

    server = SpecServer(server_script)
    address = await server.start()
    engine = RemoteEngine(Server.from_options(address, wire.CHAT_PATH))
    try:
        def drive():
            outputs, sent, live = [], 0, False
            end = time.monotonic() + 30
            while time.monotonic() < end and len([o for o in outputs if o.text == "c2"]) < 3:
                for event in engine.poll(0.02):
                    live |= isinstance(event, Ready)
                    assert not isinstance(event, Failed), event
                    if isinstance(event, Output):
                        outputs.append(event)
                if live and engine.in_flight < 2 and engine.send_frame(_frames(1)[0]):
                    sent += 1
                    if sent == 6:
                        engine.reset()
            return outputs

        outputs = await asyncio.to_thread(drive)
    finally:
        engine.close()
        await server.stop()
    assert server.connections == 2
    # The second connection's answers: from its frame 0 on (a frame's text may ride on the next one).
    starts = [i for i, o in enumerate(outputs) if o.index == 0]
    assert len(starts) == 2 and outputs[starts[1] - 1].index > 0
    second = outputs[starts[1]:]
    assert [o.index for o in second] == list(range(len(second)))
    assert {o.text for o in second} - {None} == {"c2"}  # nothing of the first connection after the reset


async def test_frames_a_server_drops_are_answered_with_silence_and_counted(monkeypatch):
    monkeypatch.setattr(chat, "LOST_AFTER_S", 0.5)

    async def dropping(ws, request):
        await ws.send_bytes(wire.HANDSHAKE_PYTHON)
        await echo_steps(ws, lambda step, frame: [] if step in (3, 4) else [(wire.Kind.AUDIO, frame)])

    server = SpecServer(dropping)
    address = await server.start()
    engine = RemoteEngine(Server.from_options(address, wire.CHAT_PATH))
    try:
        frames = _frames(8)
        events, outputs = await _run(engine, frames)
    finally:
        await server.stop()
    assert [o.index for o in outputs] == list(range(8))
    assert engine.skipped == 2
    assert [o.pcm is None for o in outputs].count(True) == 3  # frame 0, and the two the server dropped


async def test_a_slow_server_gets_no_more_than_the_frames_in_flight_allow():
    """The lag bound holds through a server: one slower than real time (a 200 ms step) is sent at
    most `max_in_flight` frames ahead (the local bound, plus the connection's round trip rounded up
    to whole frames: one on loopback); the frames beyond are refused and counted, as with a slow
    local engine."""
    async def slow(ws, request):
        await ws.send_bytes(wire.HANDSHAKE_PYTHON)
        await echo_steps(ws, lambda step, frame: [(wire.Kind.AUDIO, frame)], step_s=0.2)

    server = SpecServer(slow)
    address = await server.start()
    engine = RemoteEngine(Server.from_options(address, wire.CHAT_PATH))
    try:
        def live_pace():
            most, live, next_at, frames = 0, False, None, 0
            while frames < 40:
                live |= any(isinstance(e, Ready) for e in engine.poll(0.01))
                if live and time.monotonic() >= (next_at or 0):
                    engine.send_frame(_frames(1)[0])
                    most, frames = max(most, engine.in_flight), frames + 1
                    next_at = time.monotonic() + 0.08
            return most

        most = await asyncio.to_thread(live_pace)
    finally:
        engine.close()
        await server.stop()
    assert engine.max_in_flight == MAX_IN_FLIGHT_FRAMES + 1
    assert most == engine.max_in_flight
    assert engine.skipped >= 15  # 40 frames offered in 3.2 s, about 16 answered
