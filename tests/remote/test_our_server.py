"""`moshi chat --url` and `moshi see --url` headless against our own `moshi serve` (Moshi and
MoshiVis on tiny checkpoints), through a relay that keeps what passes: the picture goes first, the
words written are the words (plain or coloured) the server sent, the voice written is its voice."""

import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from audio import FRAME_SIZE
from engine import wire
from engine.tiny import write_tiny_checkpoint
from serve.support import speech, start_ours

from .servers import RecordingRelay, decode_opus, moshi_cli

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("kind", ["chat", "see"])
async def test_headless_url_against_moshi_serve(kind, tmp_path):
    folder = write_tiny_checkpoint(tmp_path / kind, kind, seed=2)
    pcm = speech(3.0)
    soundfile.write(tmp_path / "me.wav", pcm, 24000, subtype="FLOAT")
    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32), (20, 160, 40)).save(picture)
    server = start_ours(folder, tmp_path, "--dtype", "float32")
    relay = RecordingRelay(f"ws://127.0.0.1:{server.port}")
    address = await relay.start()
    try:
        command = ["chat"] if kind == "chat" else ["see", picture]
        rc, out, err = await moshi_cli(*command, "--url", address, "--input", tmp_path / "me.wav",
                                    "--output", tmp_path / "out.wav", "--transcript", tmp_path / "words.txt")
    finally:
        await relay.stop()
        server.stop()
    assert rc == 0, err + server.output()
    if kind == "see":
        assert relay.to_server[0] == wire.message(wire.Kind.IMAGE, picture.read_bytes())
        assert "xa_start=16" in relay.query
        pieces = [wire.parse_colored_text(p)[1] for p in relay.sent(wire.Kind.COLORED_TEXT, relay.to_client)]
        assert not relay.sent(wire.Kind.TEXT, relay.to_client)
    else:
        pieces = [p.decode() for p in relay.sent(wire.Kind.TEXT, relay.to_client)]
    assert len(pieces) > 3
    assert (tmp_path / "words.txt").read_text() == "".join(pieces)
    [metadata] = relay.sent(wire.Kind.METADATA, relay.to_client)  # what the client's status bar shows
    assert json.loads(metadata)["model"] == str(folder)
    frames = len(pcm) // FRAME_SIZE
    voice = decode_opus(relay.sent(wire.Kind.AUDIO, relay.to_client))
    ours, _ = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert len(ours) == frames * FRAME_SIZE and len(voice) == (frames - 1) * FRAME_SIZE
    np.testing.assert_allclose(ours[FRAME_SIZE:], np.clip(voice, -1, 1), rtol=0, atol=2 / 32768)


async def test_tls_and_a_key_against_moshi_serve(tls_cert, tmp_path):
    """`moshi serve --ssl DIR --api-key KEY`: the client verifies the self-signed certificate with
    --ca-cert and shows the key from MOSHI_API_KEY; without the key it is refused in one line."""
    folder = write_tiny_checkpoint(tmp_path / "chat", "chat", seed=2)
    soundfile.write(tmp_path / "me.wav", speech(1.0), 24000, subtype="FLOAT")
    server = start_ours(folder, tmp_path, "--dtype", "float32", "--ssl", str(tls_cert), "--api-key", "sesame")
    url = f"https://localhost:{server.port}"
    try:
        args = ["chat", "--url", url, "--ca-cert", tls_cert / "cert.pem", "--input", tmp_path / "me.wav"]
        rc, out, err = await moshi_cli(*args, "--output", tmp_path / "out.wav", env={"MOSHI_API_KEY": "sesame"})
        assert rc == 0, err + server.output()
        assert soundfile.info(tmp_path / "out.wav").frames == 24000 // FRAME_SIZE * FRAME_SIZE
        rc, out, err = await moshi_cli(*args, env={"MOSHI_API_KEY": ""})
        assert rc == 1
        assert err.splitlines()[-1] == (f"moshi: error: wss://localhost:{server.port}/api/chat refused no key "
                                        "(--api-key or MOSHI_API_KEY): HTTP 401")
        rc, out, err = await moshi_cli("chat", "--url", url, "--input", tmp_path / "me.wav",
                                       env={"MOSHI_API_KEY": "sesame"})
        assert rc == 1 and "certificate is not trusted" in err.splitlines()[-1]
    finally:
        server.stop()
    assert "sesame" not in server.output()
