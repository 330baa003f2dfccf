"""`moshi chat --url` headless against Kyutai's own server (`python -m moshi.server` of the reference
package) on a tiny checkpoint, through a relay that keeps what passes: the words we write are the
words the server sent, the audio the server received decodes to our input, the voice we write is
the voice it sent; a second client waits for the server's slot and says so; a server killed
mid-conversation ends the run with one line, a non-zero exit and a valid recording."""

import asyncio
import time

import numpy as np
import pytest
import soundfile
import sphn

from audio import FRAME_SIZE
from engine import wire
from engine.remote.chat import WAITING
from engine.tiny import write_tiny_checkpoint

from serve.support import greedy, speech

from .servers import RecordingRelay, decode_opus, kyutai_server, moshi_cli, spectrogram_correlation

pytest.importorskip("moshi.models.loaders")  # the reference package
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """Greedy: what the server says does not depend on the sessions before (its generator goes on)."""
    return greedy(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "chat", "chat", seed=3))


@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
    with kyutai_server(tiny_chat, tmp_path_factory.mktemp("server")) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def speechlike(tmp_path_factory):
    """3 s of voice-like sound, and its file."""
    pcm = speech(3.0)
    path = tmp_path_factory.mktemp("input") / "speech.wav"
    soundfile.write(path, pcm, 24000, subtype="FLOAT")
    return path, pcm


async def test_headless_chat_through_kyutai_server(server, speechlike, tmp_path):
    path, pcm = speechlike
    relay = RecordingRelay(f"ws://{server}")
    address = await relay.start()
    try:
        rc, out, err = await moshi_cli("chat", "--url", address, "--input", path, "--output", tmp_path / "out.wav",
                                    "--transcript", tmp_path / "words.txt")
    finally:
        await relay.stop()
    assert rc == 0, err
    assert f"connecting to ws://{address}/api/chat" in err
    # The words: all the server sent, in order, and nothing else.
    said = "".join(p.decode() for p in relay.sent(wire.Kind.TEXT, relay.to_client))
    assert len(said.split()) > 3
    assert (tmp_path / "words.txt").read_text() == said
    assert out.strip("\n") == said
    # What the server heard: the input's whole frames, decoded as the server decodes them.
    frames = len(pcm) // FRAME_SIZE
    heard = decode_opus(relay.sent(wire.Kind.AUDIO, relay.to_server))
    assert len(heard) == frames * FRAME_SIZE
    # Opus keeps a voice's spectrum, not the phases of its harmonics: the waveforms of a harmonic
    # buzz correlate at about 0.8 through the codec alone, its spectrograms at 0.99.
    assert spectrogram_correlation(pcm[:frames * FRAME_SIZE], heard) > 0.9
    # And exactly what the codec makes of the input's frames: every one sent, in order, unchanged.
    writer = sphn.OpusStreamWriter(24000)
    expected = decode_opus([writer.append_pcm(f) for f in pcm[:frames * FRAME_SIZE].reshape(frames, FRAME_SIZE)])
    np.testing.assert_array_equal(heard, expected)
    # Our voice file: frame 0 silent (the server answers from its second step), then what it sent.
    voice = decode_opus(relay.sent(wire.Kind.AUDIO, relay.to_client))
    ours, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and len(ours) == frames * FRAME_SIZE
    assert len(voice) == (frames - 1) * FRAME_SIZE
    assert not ours[:FRAME_SIZE].any()
    # 16-bit samples: written at 32767 a unit, read back at 32768.
    np.testing.assert_allclose(ours[FRAME_SIZE:], np.clip(voice, -1, 1), rtol=0, atol=2 / 32768)
    assert np.abs(voice).max() > 0.01  # the server's voice is not silence: the comparison can fail


async def test_text_that_comes_late_is_all_in_the_transcript(server, speechlike, tmp_path):
    """Each text piece reaches us well after its frame of voice (a slow link): every piece rides on
    a later frame, and the last, sent after the server's last frame, is waited for at the end."""
    path, _ = speechlike
    relay = RecordingRelay(f"ws://{server}", text_delay_s=0.05)
    address = await relay.start()
    try:
        rc, out, err = await moshi_cli("chat", "--url", address, "--input", path, "--transcript", tmp_path / "words.txt")
    finally:
        await relay.stop()
    assert rc == 0, err
    pieces = [p.decode() for p in relay.sent(wire.Kind.TEXT, relay.to_client)]
    assert len(pieces) > 3
    # The server's last message is a text piece, after its last frame of voice.
    assert wire.parse(relay.to_client[-1])[0] == wire.Kind.TEXT
    assert (tmp_path / "words.txt").read_text() == "".join(pieces)
    assert out.strip("\n") == "".join(pieces)


async def test_a_second_client_waits_for_the_servers_slot(server, speechlike, tmp_path):
    """Kyutai's Python server talks with one client at a time: a second is accepted and not
    greeted until the first leaves. We say so after 3 s, then go on when the slot frees."""
    import aiohttp

    path, _ = speechlike
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(f"ws://{server}/api/chat")
        assert (await first.receive_bytes())[:1] == wire.HANDSHAKE_PYTHON
        ours = asyncio.create_task(moshi_cli("chat", "--url", server, "--input", path, "--no-tui"))
        await asyncio.sleep(6)
        assert not ours.done()
        await first.close()
    started = time.monotonic()
    rc, out, err = await ours
    assert rc == 0, err
    assert f"moshi: {WAITING}" in err
    assert time.monotonic() - started < 120


async def test_a_server_killed_mid_conversation_ends_the_run(tiny_chat, speechlike, tmp_path):
    path, pcm = speechlike
    long_input = tmp_path / "long.wav"
    soundfile.write(long_input, np.tile(pcm, 20), 24000, subtype="FLOAT")  # a minute: the kill comes first
    with kyutai_server(tiny_chat, tmp_path) as server:
        run = asyncio.create_task(moshi_cli("chat", "--url", f"127.0.0.1:{server.port}", "--input", long_input,
                                         "--output", tmp_path / "out.wav", "--transcript", tmp_path / "words.txt"))
        while server.output().count("frame handled") < 10:
            assert not run.done(), (await run)[2]
            await asyncio.sleep(0.1)
        server.process.kill()
        started = time.monotonic()
        rc, out, err = await run
    assert time.monotonic() - started < 15
    assert rc == 1
    lines = [line for line in err.splitlines() if not line.startswith("moshi: connecting")]
    assert lines == ["moshi: error: the server closed the connection"], err
    ours, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and FRAME_SIZE * 10 <= len(ours) < len(np.tile(pcm, 20))
    assert (tmp_path / "words.txt").exists()
