"""Sampling asked for in the query string of `/api/chat`, under the names Kyutai's web client sends
and its Rust server reads: each client's settings apply to its own slot of the batch, and a client
gets what the local runner gives with those settings alone (its seeds drawn from as the local
runner draws from its global seed), whoever else shares the batch."""

import asyncio
import json
import urllib.parse

import aiohttp
import numpy as np
import pytest
import sphn
import torch

from engine import wire
from engine.moshi.runner import ChatRunner
from engine.options import ModelOptions
from engine.remote.connect import RemoteError, Server
from engine.runner import FirstFrame, load_models

from .support import FRAME, SAMPLE_RATE, speech, start_ours, talk

BATCH = 3
SECONDS = 3.0
# Kyutai's server sends each step's text token as its piece, but for these two (0, and 3, the padding).
UNSENT = (0, 3)
TEXT_SAMPLED = {"text_temperature": "1.2", "text_topk": "40", "text_seed": "7"}
AUDIO_SAMPLED = {"audio_temperature": "1.0", "audio_topk": "100", "audio_seed": "11"}


@pytest.fixture(scope="module")
def ours(tiny_chat, tmp_path_factory):
    # float32: a bfloat16 batch rounds each row a little differently from the row alone (greedy
    # tokens do not move, sampled ones may).
    server = start_ours(tiny_chat, tmp_path_factory.mktemp("ours"), "--batch-size", str(BATCH), "--dtype", "float32")
    yield server
    assert server.stop() == 0, server.output()[-2000:]


def heard_by_server(pcm: np.ndarray) -> list[np.ndarray]:
    """The frames a server cuts from this audio sent as Kyutai's client sends it (one Ogg/Opus stream,
    a 1920-sample block at a time)."""
    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    decoded = [reader.append_bytes(writer.append_pcm(pcm[start:start + FRAME]))
               for start in range(0, len(pcm) - FRAME + 1, FRAME)]
    decoded = np.concatenate(decoded)
    return [decoded[start:start + FRAME] for start in range(0, len(decoded) - FRAME + 1, FRAME)]


def alone(folder, pcm: np.ndarray, query: dict[str, str]) -> list[str]:
    """The local runner of live conversations, on its own, with these settings: its text pieces as a
    server sends them. A seed seeds torch's generator, which the local runner draws from (only one
    of the two streams is sampled in these tests, so one generator is each stream's)."""
    options = ModelOptions(hf_repo=str(folder), dtype="float32",
                           temp_text=float(query.get("text_temperature", 0)),
                           top_k_text=int(query.get("text_topk", 25)),
                           temp=float(query.get("audio_temperature", 0)), top_k=int(query.get("audio_topk", 250)))
    assert not ("text_seed" in query and "audio_seed" in query)
    runner = ChatRunner(load_models(options, "unused"), FirstFrame.SERVER)
    torch.manual_seed(int(query.get("text_seed", query.get("audio_seed", 0))))
    pieces = []
    for frame in heard_by_server(pcm):
        token = runner.step(frame).token
        if token is not None and token not in UNSENT:
            pieces.append(runner.models.tokenizer.id_to_piece(token).replace("▁", " "))
    return pieces


def test_each_client_samples_its_own_way_and_gets_what_it_would_alone(ours, tiny_chat):
    pcm = [speech(SECONDS, seed) for seed in range(BATCH)]
    queries = [{}, TEXT_SAMPLED, AUDIO_SAMPLED]

    async def together():
        # The text-sampled client sends slowly: the steps its audio is not there for are undone for
        # its slot (held), its draws included.
        return await asyncio.gather(*(talk(ours.url(urllib.parse.urlencode(query)), audio, pace=pace)
                                      for query, audio, pace in zip(queries, pcm, (0, 0.15, 0))))

    heard = asyncio.run(together())
    expected = [alone(tiny_chat, audio, query) for query, audio in zip(queries, pcm)]
    for got, want in zip(heard, expected):
        assert not got.errors and len(want) > 10
        assert got.texts == want
    # Sampling changed what was said: the greedy words of the same audio are other words.
    for index in (1, 2):
        assert expected[index] != alone(tiny_chat, pcm[index], {})
    # And a sampled client's words follow its seed.
    assert alone(tiny_chat, pcm[1], {**TEXT_SAMPLED, "text_seed": "8"}) != expected[1]


def test_sampling_settings_are_told_in_the_metadata(ours):
    async def metadata():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ours.url("text_temperature=0.5&audio_topk=7")) as ws:
                await ws.receive(timeout=30)  # the handshake
                return (await ws.receive(timeout=30)).data

    told = json.loads((asyncio.run(metadata()))[1:])
    assert told["text_temperature"] == 0.5 and told["audio_topk"] == 7
    assert told["audio_temperature"] == 0.0 and told["text_topk"] == 25  # the checkpoint's, not asked


@pytest.mark.parametrize("query, said", [
    ("text_temperature=warm", "text_temperature must be a number from 0 (greedy) up, not 'warm'"),
    ("audio_temperature=-1", "audio_temperature must be a number from 0 (greedy) up, not '-1'"),
    ("text_temperature=nan", "text_temperature must be a number"),
    ("text_topk=2.5", "text_topk must be a whole number from 0 (every token) up, not '2.5'"),
    ("audio_topk=-3", "audio_topk must be a whole number"),
    ("text_seed=-1", "text_seed must be a whole number from 0 to 18446744073709551615"),
    ("audio_seed=18446744073709551616", "audio_seed must be a whole number"),
    ("pad_mult=1.5", "this server does not apply pad_mult"),
    ("repetition_penalty=1.15", "this server does not apply repetition_penalty"),
])
def test_a_bad_setting_is_refused_before_the_upgrade(ours, query, said):
    async def connect():
        async with aiohttp.ClientSession() as session:
            async with session.get(ours.http("/api/chat?" + query),
                                   headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                            "Sec-WebSocket-Version": "13",
                                            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as answer:
                return answer.status, await answer.text()

    status, text = asyncio.run(connect())
    assert status == 400 and said in text


def test_a_refused_client_disturbs_no_one(ours, tiny_chat):
    """Kyutai's web client's own values (pad_mult 0, repetition penalty 1 over 64) are taken; a bad
    value is refused while another conversation goes on, which gets what it gets alone."""
    pcm = speech(SECONDS, 0)
    web_client = {"text_temperature": "0", "text_topk": "25", "audio_temperature": "0", "audio_topk": "250",
                  "pad_mult": "0", "repetition_penalty_context": "64", "repetition_penalty": "1"}

    async def together():
        running = asyncio.create_task(talk(ours.url(urllib.parse.urlencode(web_client)), pcm))
        refused = []
        for _ in range(3):
            try:
                await talk(ours.url("text_topk=many"), pcm)
            except aiohttp.WSServerHandshakeError as exc:
                refused.append(exc.status)
        return await running, refused

    heard, refused = asyncio.run(together())
    assert refused == [400] * 3
    assert heard.texts == alone(tiny_chat, pcm, {})


def test_our_client_says_the_server_refused_its_settings(ours):
    async def connect():
        async with aiohttp.ClientSession() as session:
            await Server.from_options(ours.url(), wire.CHAT_PATH).connect(session, {"text_topk": -1})

    with pytest.raises(RemoteError, match=r"refused the settings asked for \(HTTP 400\)"):
        asyncio.run(connect())
