"""`/api/chat` against Kyutai's own server: a client that speaks as Kyutai's `moshi.client` gets the
same text pieces from our `moshi serve` as from `python -m moshi.server` of the reference package,
on the same tiny checkpoint and the same audio (greedy); and several clients at once, stepped as
one batch, each get what they get alone."""

import asyncio
import importlib.util
import json
import urllib.request

import pytest

from engine import wire

from .support import speech, start_kyutai, start_ours, talk

# Importing moshi.server runs it: look for it without importing.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("moshi") is None, reason="the reference package moshi==0.2.13")
BATCH = 3


@pytest.fixture(scope="module")
def ours(tiny_chat, tmp_path_factory):
    server = start_ours(tiny_chat, tmp_path_factory.mktemp("ours"), "--batch-size", str(BATCH))
    yield server
    assert server.stop() == 0, server.output()[-2000:]


@pytest.fixture(scope="module")
def kyutai(tiny_chat, tmp_path_factory):
    server = start_kyutai(tiny_chat, tmp_path_factory.mktemp("kyutai"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alone(kyutai):
    """What Kyutai's server answers each of three recordings, one client at a time."""
    return [asyncio.run(talk(kyutai.url(), speech(3.0, seed))) for seed in range(BATCH)]


def test_kyutai_server_and_ours_say_the_same_words(ours, alone):
    assert len(alone[0].texts) > 10
    # The tiny model hears its input: other audio, other words.
    assert alone[0].texts != alone[1].texts != alone[2].texts
    heard = asyncio.run(talk(ours.url(), speech(3.0, 0)))
    assert heard.handshake == wire.HANDSHAKE_PYTHON
    assert heard.texts == alone[0].texts
    assert heard.samples == alone[0].samples  # the same number of frames of voice came back


def test_clients_stepped_together_each_get_what_they_get_alone(ours, alone):
    async def together():
        return await asyncio.gather(*(talk(ours.url(), speech(3.0, seed)) for seed in range(BATCH)))

    for heard, reference in zip(asyncio.run(together()), alone):
        assert heard.texts == reference.texts


def test_a_client_that_sends_slowly_holds_no_one_back_and_is_not_changed(ours, alone):
    """One client sends a block every 150 ms, the others all at once: the slow one sits out the steps
    its audio is not there for (held), and every one still gets what it gets alone."""
    held = _counter(ours, "moshi_holds_total")

    async def together():
        return await asyncio.gather(talk(ours.url(), speech(3.0, 0), pace=0.15),
                                    *(talk(ours.url(), speech(3.0, seed)) for seed in (1, 2)))

    for heard, reference in zip(asyncio.run(together()), alone):
        assert heard.texts == reference.texts
    assert _counter(ours, "moshi_holds_total") > held + 10


def test_one_leaving_mid_stream_does_not_disturb_the_others(ours, alone):
    async def together():
        leaver = talk(ours.url(), speech(3.0, 2), leave_after=12)
        return await asyncio.gather(talk(ours.url(), speech(3.0, 0)), talk(ours.url(), speech(3.0, 1)), leaver)

    first, second, leaver = asyncio.run(together())
    assert first.texts == alone[0].texts and second.texts == alone[1].texts
    assert leaver.texts == alone[2].texts[:len(leaver.texts)] and len(leaver.texts) < len(alone[2].texts)
    # Its slot is free again, and a new conversation in it starts from the beginning.
    assert asyncio.run(talk(ours.url(), speech(3.0, 2))).texts == alone[2].texts


def test_a_client_beyond_the_batch_is_refused_at_once(ours):
    async def crowd():
        holders = [asyncio.create_task(talk(ours.url(), speech(6.0, seed))) for seed in range(BATCH)]
        while _get(ours, "/healthz")["free_slots"] > 0:
            await asyncio.sleep(0.05)
        extra = await asyncio.wait_for(talk(ours.url(), speech(1.0, 9)), timeout=10)
        return extra, await asyncio.gather(*holders)

    extra, holders = asyncio.run(crowd())
    assert extra.errors == [wire.NO_FREE_CHANNELS] and extra.handshake is None
    assert all(holder.texts and not holder.errors for holder in holders)
    assert "moshi_refused_total 1.0" in _text(ours, "/metrics")


def test_json_and_prometheus_endpoints(ours):
    assert _get(ours, "/healthz") == {"status": "ok", "free_slots": BATCH}
    assert _get(ours, "/api/build_info")["package"] == "moshi-tui"
    chat = _get(ours, "/api/modules_info")["chat"]
    assert chat["path"] == wire.CHAT_PATH and chat["batch_size"] == BATCH and chat["type"] == "Moshi"
    metrics = _text(ours, "/metrics")
    for name in ("moshi_sessions 0.0", f"moshi_free_slots {BATCH}.0", "moshi_step_seconds_bucket",
                 "moshi_frames_dropped_total", "moshi_errors_total"):
        assert name in metrics
    assert _counter(ours, "moshi_step_seconds_count") > 0


def _counter(server, name: str) -> float:
    return float(_text(server, "/metrics").split(f"\n{name} ")[1].split()[0])


def _text(server, path: str) -> str:
    with urllib.request.urlopen(server.http(path), timeout=10) as answer:
        return answer.read().decode()


def _get(server, path: str):
    return json.loads(_text(server, path))
