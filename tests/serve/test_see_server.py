"""MoshiVis at `/api/chat` (served on every address, without a key: a warning): the picture first, then the handshake, then words as coloured text. The
words and their colours are those of the local `SeeRunner` (what `moshi see` runs) on the audio the
server decoded, each colour its gate's on MoshiVis's scale; two clients with different pictures at
once each get their own picture's words."""

import asyncio
import io

import aiohttp
import numpy as np
import pytest
import sphn
from PIL import Image, ImageDraw

from engine import wire
from engine.moshivis.runner import SeeRunner
from engine.options import SeeOptions
from engine.tiny import write_tiny_checkpoint

from .support import FRAME, SAMPLE_RATE, greedy, speech, start_ours, talk

SECONDS = 3.0


def _picture(colour, shape) -> bytes:
    image = Image.new("RGB", (320, 240), colour)
    draw = ImageDraw.Draw(image)
    getattr(draw, shape)([80, 40, 240, 200], fill=(250, 210, 40))
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()


PICTURES = [_picture((30, 120, 200), "ellipse"), _picture((200, 40, 40), "rectangle")]


@pytest.fixture(scope="module")
def tiny_see(tmp_path_factory):
    return greedy(write_tiny_checkpoint(tmp_path_factory.mktemp("see") / "see", "see", seed=0))


@pytest.fixture(scope="module")
def server(tiny_see, tmp_path_factory):
    server = start_ours(tiny_see, tmp_path_factory.mktemp("see-serve"), "--batch-size", "2", "--host", "0.0.0.0")
    yield server
    assert server.stop() == 0


def _local(folder, picture: bytes, tmp_path, xa_start=None) -> tuple[list[str], list[int]]:
    """What `moshi see`'s runner says and how it colours it, frame by frame, on the audio the server
    decodes from the client's Opus stream."""
    path = tmp_path / "picture.png"
    path.write_bytes(picture)
    runner = SeeRunner.load(SeeOptions(hf_repo=str(folder), image=str(path), xa_start=xa_start))
    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    pcm = speech(SECONDS)
    decoded = np.concatenate([reader.append_bytes(writer.append_pcm(pcm[i:i + FRAME]))
                              for i in range(0, len(pcm) - FRAME + 1, FRAME)])
    texts, colours = [], []
    for start in range(0, len(decoded) - FRAME + 1, FRAME):
        out = runner.step(decoded[start:start + FRAME])
        if out.token is not None and out.token not in (0, 3):  # what Kyutai's servers send
            texts.append(runner.models.tokenizer.id_to_piece(out.token).replace("▁", " "))
            colours.append(wire.gate_colour(out.gate))
    runner.close()
    return texts, colours


def test_coloured_words_are_the_local_runners(server, tiny_see, tmp_path):
    async def together():
        return await asyncio.gather(*(talk(server.url(), speech(SECONDS), picture=p) for p in PICTURES))

    heard = asyncio.run(together())
    for picture, got in zip(PICTURES, heard):
        texts, colours = _local(tiny_see, picture, tmp_path)
        assert got.handshake == wire.HANDSHAKE_PYTHON
        assert got.texts == texts and got.colours == colours
    # The picture matters, and the gate opens: the colours are not all one.
    assert heard[0].texts != heard[1].texts
    assert len(set(heard[0].colours)) > 1


def test_the_client_says_when_to_look(server, tiny_see, tmp_path):
    """`?xa_start=`, as Kyutai's MoshiVis clients send it: from that step on the model looks at the
    picture, in that conversation only."""
    async def together():
        return await asyncio.gather(talk(server.url(f"{wire.XA_START_QUERY}=2"), speech(SECONDS), picture=PICTURES[0]),
                                    talk(server.url(), speech(SECONDS), picture=PICTURES[0]))

    early, default = asyncio.run(together())
    assert (early.texts, early.colours) == _local(tiny_see, PICTURES[0], tmp_path, xa_start=2)
    assert (default.texts, default.colours) == _local(tiny_see, PICTURES[0], tmp_path)
    assert early.colours != default.colours


def test_listening_beyond_loopback_without_a_key_warns(server):
    assert "without --api-key" in server.output()


def test_no_picture_first_is_an_error(server):
    async def first(message: bytes):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url()) as ws:
                await ws.send_bytes(message)
                answer = await ws.receive(timeout=30)
                return answer.data, (await ws.receive(timeout=30)).type

    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    for message in (wire.message(wire.Kind.AUDIO, writer.append_pcm(speech(0.08))),
                    wire.message(wire.Kind.IMAGE, b"not a picture")):
        data, then = asyncio.run(first(message))
        assert data[0] == wire.Kind.ERROR and b"picture" in data
        assert then in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    bad = asyncio.run(talk(server.url(f"{wire.XA_START_QUERY}=soon"), speech(0.5), picture=PICTURES[0]))
    assert bad.handshake is None and wire.XA_START_QUERY in bad.errors[0]
