"""`moshi chat/see --url` through the real CLI: bad server options refused in one line before
anything connects, a server's error shown, and `see --url` headless against a MoshiVis server written
to the protocol (the picture first, the coloured words written as locally)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from engine import wire

from .servers import SpecServer, echo_steps, moshi_cli

pytestmark = pytest.mark.timeout(120)


def _moshi(*args, **env):
    return subprocess.run([sys.executable, "-m", "moshi_tui", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **env))


@pytest.mark.parametrize("args, message", [
    (["--url", "ftp://gpu:1"], "--url ftp://gpu:1: the scheme must be ws, wss, http or https, not 'ftp'"),
    (["--url", "gpu:99999"], "--url gpu:99999: the port is not a number from 1 to 65535"),
    (["--url", "wss://gpu", "--ca-cert", "/nonexistent/ca.pem"], "--ca-cert /nonexistent/ca.pem: no such file"),
    (["--url", "ws://gpu:1", "--insecure"], "--insecure goes with a TLS server (wss:// or https://)"),
    (["--insecure"], "--insecure"),  # without --url
    (["--url", "gpu:1", "--hf-repo", "kyutai/moshiko-pytorch-bf16"], "the server runs its own model"),
    (["--url", "gpu:1", "--quantize", "int8"], "the server runs its own model"),
    (["--url", "gpu:1", "--user-stt", "off"], "the server runs its own model"),
])
def test_bad_server_options_are_one_line_before_connecting(args, message):
    result = _moshi("chat", "--no-tui", "--no-record", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_see_checks_its_server_options_too(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    result = _moshi("see", tmp_path / "p.png", "--url", "wss://gpu", "--ca-cert", tmp_path / "missing.pem")
    assert result.returncode == 2 and "--ca-cert" in result.stderr and "no such file" in result.stderr


@pytest.fixture
def recording(tmp_path):
    t = np.arange(24000) / 24000
    path = tmp_path / "me.wav"
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 24000)
    return path


async def test_a_full_server_says_so_and_the_run_fails(recording, tmp_path):
    async def full(ws, request):
        await ws.send_bytes(wire.message(wire.Kind.ERROR, wire.NO_FREE_CHANNELS.encode()))

    server = SpecServer(full)
    address = await server.start()
    try:
        rc, out, err = await moshi_cli("chat", "--url", address, "--input", recording, "--output", tmp_path / "o.wav")
    finally:
        await server.stop()
    assert rc == 1
    assert err.splitlines()[-1] == f"moshi: error: the server says: {wire.NO_FREE_CHANNELS}"
    assert soundfile.info(tmp_path / "o.wav").frames == 0  # written, and valid


async def test_see_url_sends_the_picture_first_and_writes_the_words(recording, tmp_path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(picture)
    seen = {}

    async def moshivis(ws, request):
        seen["query"], seen["first"] = dict(request.query), await ws.receive_bytes()
        await ws.send_bytes(wire.HANDSHAKE_PYTHON)
        await echo_steps(ws, lambda step, frame: [(wire.Kind.AUDIO, frame),
                                                  (wire.Kind.COLORED_TEXT, bytes([step % 11]) + b" red")])

    server = SpecServer(moshivis)
    address = await server.start()
    try:
        rc, out, err = await moshi_cli("see", picture, "--url", address, "--xa-start", 3, "--input", recording,
                                     "--output", tmp_path / "o.wav", "--transcript", tmp_path / "t.txt")
    finally:
        await server.stop()
    assert rc == 0, err
    assert seen["first"] == wire.message(wire.Kind.IMAGE, picture.read_bytes())
    assert seen["query"] == {"xa_start": "3"}
    frames = 24000 // 1920
    assert out.strip() == " ".join(["red"] * (frames - 1))
    assert (tmp_path / "t.txt").read_text() == " red" * (frames - 1)
    assert soundfile.info(tmp_path / "o.wav").frames == frames * 1920
