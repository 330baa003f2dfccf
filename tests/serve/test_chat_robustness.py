"""`moshi serve` among real clients that misbehave, over TLS with API keys: a missing or wrong key,
a malformed message, a client that stops reading, one killed mid-stream, and SIGTERM."""

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import sphn

from engine import wire

from .support import FRAME, SAMPLE_RATE, env, speech, start_ours, talk

KEYS = [secrets.token_hex(16), secrets.token_hex(16)]
SLOTS = 2


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", folder / "key.pem", "-out", folder / "cert.pem"],
                   check=True, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def trusted(certificate):
    return ssl.create_default_context(cafile=certificate / "cert.pem")


@pytest.fixture(scope="module")
def server(tiny_chat, certificate, tmp_path_factory):
    """TLS, one key on the command line and one in MOSHI_API_KEYS."""
    server = start_ours(tiny_chat, tmp_path_factory.mktemp("robust"), "--batch-size", str(SLOTS), "--ssl",
                        str(certificate), "--api-key", KEYS[0], extra_env={"MOSHI_API_KEYS": KEYS[1]})
    yield server
    server.stop()
    assert not any(key in server.output() for key in KEYS)  # keys are never logged


@pytest.fixture(scope="module")
def alone(server, trusted):
    return asyncio.run(talk(server.url(), speech(2.0, 0), headers={wire.API_KEY_HEADER: KEYS[0]}, ssl=trusted))


def test_keys_are_checked_before_the_upgrade(server, trusted, alone):
    async def status(url, headers=None):
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url, headers=headers, ssl=trusted):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(status(server.url())) == 401
    assert asyncio.run(status(server.url(), {wire.API_KEY_HEADER: KEYS[0][:-1] + "x"})) == 401
    assert asyncio.run(status(server.url(f"{wire.API_KEY_QUERY}=nope"))) == 401
    assert len(alone.texts) > 5 and alone.handshake == wire.HANDSHAKE_PYTHON
    by_query = asyncio.run(talk(server.url(f"{wire.API_KEY_QUERY}={KEYS[1]}"), speech(2.0, 0), ssl=trusted))
    assert by_query.texts == alone.texts


def test_tls_is_real(server):
    """A client that does not trust the self-signed certificate is stopped by it."""
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        asyncio.run(talk(server.url(f"{wire.API_KEY_QUERY}={KEYS[0]}"), speech(0.5, 0)))


def test_a_malformed_message_ends_that_session_only(server, trusted, alone):
    url = server.url(f"{wire.API_KEY_QUERY}={KEYS[0]}")

    async def bad(payload, text=False):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, ssl=trusted) as ws:
                assert (await ws.receive(timeout=30)).data == wire.HANDSHAKE_PYTHON
                await (ws.send_str(payload) if text else ws.send_bytes(payload))
                error = await ws.receive(timeout=30)
                closing = await ws.receive(timeout=30)
                return error.data, closing.type

    async def scene():
        good = asyncio.create_task(talk(url, speech(2.0, 0), ssl=trusted, pace=0.02))
        answers = [await bad(wire.message(wire.Kind.AUDIO, b"not an ogg stream" * 4)), await bad("hello", text=True)]
        return answers, await good

    (garbage, text), good = asyncio.run(scene())
    for data, closing in (garbage, text):
        assert data[0] == wire.Kind.ERROR and closing in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert b"Ogg" in garbage[0]
    assert good.texts == alone.texts  # the session beside them went on undisturbed
    assert _metric(server, "moshi_errors_total") >= 2


def test_a_client_that_stops_reading_costs_bounded_memory(server, trusted):
    """It sends 40 s of audio and reads nothing: the server steps it all, drops the oldest answers
    it cannot send (counted) and its memory stays flat."""
    before, dropped = _rss(server), _metric(server, "moshi_frames_dropped_total")
    frames_before = _metric(server, "moshi_frames_total")
    sock = _raw_websocket(server, trusted)
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    pcm = speech(40.0, 5)
    for start in range(0, len(pcm) - FRAME + 1, FRAME):
        data = writer.append_pcm(pcm[start:start + FRAME])
        if data:
            sock.sendall(_frame(wire.message(wire.Kind.AUDIO, data)))
    deadline = time.monotonic() + 120
    while _metric(server, "moshi_frames_total") < frames_before + len(pcm) // FRAME and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric(server, "moshi_frames_total") >= frames_before + len(pcm) // FRAME
    assert _metric(server, "moshi_frames_dropped_total") > dropped + 50
    assert _rss(server) - before < 40 << 20
    port = sock.getsockname()[1]
    sock.close()
    # Its log line: the peer, how long, the frames stepped and the answers dropped.
    deadline = time.monotonic() + 10
    while f"127.0.0.1:{port} " not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(line for line in server.output().splitlines() if f"127.0.0.1:{port} " in line)
    assert f"frames={len(pcm) // FRAME} " in line and int(line.split("drops=")[1].split()[0]) > 50


def test_a_killed_client_frees_its_slot(server, trusted, certificate):
    script = (f"import asyncio, ssl; from tests.serve.support import speech, talk; "
              f"asyncio.run(talk({server.url(f'{wire.API_KEY_QUERY}={KEYS[0]}')!r}, speech(30.0), pace=0.08, "
              f"ssl=ssl.create_default_context(cafile={str(certificate / 'cert.pem')!r})))")
    client = subprocess.Popen([sys.executable, "-c", script], env=env(), cwd=Path(__file__).parents[2])
    try:
        frames = _metric(server, "moshi_frames_total")
        deadline = time.monotonic() + 60
        while _metric(server, "moshi_frames_total") < frames + 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _health(server)["free_slots"] == SLOTS - 1
    finally:
        client.kill()
        client.wait()
    deadline = time.monotonic() + 5
    while _health(server)["free_slots"] < SLOTS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(server)["free_slots"] == SLOTS


def test_sigterm_closes_the_sessions_and_exits_0(server, trusted):
    async def scene():
        async with aiohttp.ClientSession() as session:
            url = server.url(f"{wire.API_KEY_QUERY}={KEYS[0]}")
            async with session.ws_connect(url, ssl=trusted) as ws:
                assert (await ws.receive(timeout=30)).data == wire.HANDSHAKE_PYTHON
                writer = sphn.OpusStreamWriter(SAMPLE_RATE)
                await ws.send_bytes(wire.message(wire.Kind.AUDIO, writer.append_pcm(speech(0.08))))
                server.process.send_signal(signal.SIGTERM)
                while True:
                    message = await ws.receive(timeout=30)
                    if message.type != aiohttp.WSMsgType.BINARY:
                        return message, ws.close_code

    message, code = asyncio.run(scene())
    assert message.type == aiohttp.WSMsgType.CLOSE and code == aiohttp.WSCloseCode.GOING_AWAY
    assert server.process.wait(30) == 0
    assert "drained" in server.output()


def _raw_websocket(server, trusted) -> ssl.SSLSocket:
    """A websocket by hand over a socket with a tiny receive buffer, so that not reading shows at once."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    sock = trusted.wrap_socket(raw, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {wire.CHAT_PATH}?{wire.API_KEY_QUERY}={KEYS[0]} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def _frame(payload: bytes) -> bytes:
    """A client's binary websocket frame: FIN, opcode 2, masked."""
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return b"\x82" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _rss(server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _open(server, path: str) -> str:
    context = ssl.create_default_context(cafile=None)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(server.http(path), timeout=10, context=context) as answer:
        return answer.read().decode()


def _health(server) -> dict:
    return json.loads(_open(server, "/healthz"))


def _metric(server, name: str) -> float:
    return float(_open(server, "/metrics").split(f"\n{name} ")[1].split()[0])
