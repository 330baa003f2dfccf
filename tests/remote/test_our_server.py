"""`moshi chat --url` and `moshi see --url` headless against our own `moshi serve` (Moshi and
MoshiVis on tiny checkpoints), through a relay that keeps what passes: the picture goes first, the
words written are the words (plain or coloured) the server sent, the voice written is its voice."""

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
    frames = len(pcm) // FRAME_SIZE
    voice = decode_opus(relay.sent(wire.Kind.AUDIO, relay.to_client))
    ours, _ = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert len(ours) == frames * FRAME_SIZE and len(voice) == (frames - 1) * FRAME_SIZE
    np.testing.assert_allclose(ours[FRAME_SIZE:], np.clip(voice, -1, 1), rtol=0, atol=2 / 32768)
