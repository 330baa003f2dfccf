"""`/api/asr-streaming` on loopback: our server against a client written as Kyutai's STT scripts
(aiohttp + msgpack), against `moshi transcribe --url`, several at once, and misbehaving clients.
The oracle is the local `moshi transcribe` on the same audio and checkpoint."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import msgpack
import numpy as np
import pytest
import soundfile
import sphn
from aiohttp import web

from engine.options import ModelOptions
from engine.server.app import make_app
from engine.server.asr import AsrService
from engine.stt.runner import TranscribeRunner
from engine.wire import NO_FREE_CHANNELS
from tests.transcribe_support import moshi, noise, stt_folder

SLOTS = 2
SR = 24000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`moshi serve`'s application around our AsrService, on a loopback port, in a thread of its own."""
    folder = stt_folder(tmp_path_factory.mktemp("stt") / "model")
    runner = TranscribeRunner.load(ModelOptions(hf_repo=str(folder)), batch_size=SLOTS)
    # A generous grace: on a loaded 2-core machine a test client may lag; the words must not change.
    service = AsrService(runner, grace_s=2.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def up():
        app_runner = web.AppRunner(make_app(service))
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        return app_runner

    app_runner = asyncio.run_coroutine_threadsafe(up(), loop).result()
    port = app_runner.addresses[0][1]
    yield SimpleNamespace(url=f"ws://127.0.0.1:{port}/api/asr-streaming", base=f"ws://127.0.0.1:{port}",
                          service=service, folder=folder)
    asyncio.run_coroutine_threadsafe(app_runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    runner.close()


def kyutai_audio(seconds: float, seed: int) -> np.ndarray:
    """What Kyutai's file script sends before its marker: a second of silence, the audio, silence
    (one second here, five there: the server's queue holds 10 s of a client that sends at once)."""
    return np.concatenate([np.zeros(SR, np.float32), noise(seconds, seed=seed), np.zeros(SR, np.float32)])


async def kyutai_client(url: str, pcm: np.ndarray, after_marker: float = 2.0, chunk: int = 1920):
    """As Kyutai's `transcribe_from_file_via_rust_server.py`: Audio messages of float lists, a
    Marker, silence, and words until the Marker comes back. Returns ([(text, start, end)], messages)."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={"kyutai-api-key": "public_token"}) as ws:
            async def send():
                for i in range(0, len(pcm), chunk):
                    await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [float(x) for x in pcm[i:i + chunk]]},
                                                      use_single_float=True))
                await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 0}, use_single_float=True))
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * int(after_marker * SR)},
                                                  use_single_float=True))

            sender = asyncio.create_task(send())
            answer = await _words_until_marker(ws)
            await sender
            return answer


async def _words_until_marker(ws):
    """The words (text, start, end) a server sends until its Marker (or an Error), and every message."""
    transcript, seen = [], []
    async for message in ws:
        data = msgpack.unpackb(message.data, raw=False)
        seen.append(data)
        if data["type"] == "Word":
            transcript.append([data["text"], data["start_time"], data["start_time"]])
        elif data["type"] == "EndWord" and transcript:
            transcript[-1][2] = data["stop_time"]
        elif data["type"] in ("Marker", "Error"):
            break
    return [tuple(w) for w in transcript], seen


def local_words(tmp_path: Path, pcm: np.ndarray, folder: Path) -> list[tuple]:
    """The local `moshi transcribe` of this audio: its JSON Lines words."""
    wav = tmp_path / "local.wav"
    soundfile.write(wav, pcm, SR, subtype="FLOAT")
    done = moshi("transcribe", "--model", folder, "--batch-size", 1, wav, "-f", "jsonl")
    assert done.returncode == 0, done.stderr
    return _jsonl_words(done.stdout)


def _jsonl_words(text: str) -> list[tuple]:
    lines = [json.loads(line) for line in text.splitlines()]
    return [(w["text"], w["start"], w["end"]) for w in lines if w["type"] == "word"]


def _rounded(words):
    # JSON Lines writes times to the millisecond; msgpack floats are single precision.
    return [(text, round(start, 3), round(end, 3)) for text, start, end in words]


def test_kyutai_client_gets_the_local_words(server, tmp_path):
    pcm = kyutai_audio(3.0, seed=1)
    words, seen = asyncio.run(kyutai_client(server.url, pcm))
    expected = local_words(tmp_path, pcm, server.folder)
    assert len(expected) >= 5
    assert _rounded(words) == expected
    kinds = [m["type"] for m in seen]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker" and seen[-1]["id"] == 0
    steps = [m for m in seen if m["type"] == "Step"]
    # The tiny checkpoint has the VAD heads: every step carries P(pause) over the 4 horizons.
    assert steps and all(len(m["prs"]) == 4 and all(0 <= p <= 1 for p in m["prs"]) for m in steps)
    assert [m["step_idx"] for m in steps] == list(range(len(steps)))


async def opus_client(url: str, pcm: np.ndarray, after_marker: float = 2.0, chunk: int = 1920):
    """`kyutai_client` with the audio as Ogg/Opus (moshi-server's OggOpus messages, encoded by sphn
    as Kyutai's clients do, a page pair per 1920 samples), a Ping first. The silence after the
    Marker goes as samples: the zeros the local transcription pads a file with, which Opus would
    not give back exactly. Returns the words and the audio the server decoded before the Marker."""
    writer, reader = sphn.OpusStreamWriter(SR), sphn.OpusStreamReader(SR)
    decoded = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            async def send():
                await ws.send_bytes(msgpack.packb({"type": "Ping"}))
                for i in range(0, len(pcm) - chunk + 1, chunk):
                    data = writer.append_pcm(pcm[i:i + chunk])
                    decoded.append(reader.append_bytes(data))
                    await ws.send_bytes(msgpack.packb({"type": "OggOpus", "data": data}))
                await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 0}))
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * int(after_marker * SR)},
                                                  use_single_float=True))

            sender = asyncio.create_task(send())
            words, seen = await _words_until_marker(ws)
            await sender
    assert seen[-1]["type"] == "Marker", seen[-1]
    return words, np.concatenate(decoded)


def test_ogg_opus_audio_is_transcribed_as_the_same_audio_in_samples(server, tmp_path):
    pcm = kyutai_audio(3.0, seed=1)
    words, decoded = asyncio.run(opus_client(server.url, pcm))
    # Exactly the local transcription of what Opus gave back ...
    expected = local_words(tmp_path, decoded, server.folder)
    assert len(expected) >= 5
    assert _rounded(words) == expected
    # ... which is the audio within Opus's fidelity: a few ms late (the codec's delay), 40 ms short
    # (what the decoder holds back), and close to it (this noise is harder on Opus than a voice).
    assert len(pcm) - len(decoded) < 2 * 1920
    delay = max(range(240), key=lambda lag: np.dot(pcm[:len(decoded) - lag], decoded[lag:]))
    assert np.corrcoef(pcm[:len(decoded) - delay], decoded[delay:])[0, 1] > 0.7
    # (A random tiny model's words are not those of the samples themselves: it hears the codec's noise.)


def test_ogg_opus_data_that_is_not_ogg_is_refused(server):
    async def bad():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url) as ws:
                await ws.send_bytes(msgpack.packb({"type": "OggOpus", "data": b"not an ogg page" * 10}))
                return [msgpack.unpackb(message.data) async for message in ws]

    replies = asyncio.run(bad())
    assert replies[-1]["type"] == "Error" and "OggOpus" in replies[-1]["message"], replies


def test_transcribe_url_prints_the_local_words(server, tmp_path):
    wav = tmp_path / "talk.wav"
    soundfile.write(wav, noise(4.0, seed=2), SR, subtype="FLOAT")
    local = moshi("transcribe", "--model", server.folder, wav, "-f", "jsonl")
    remote = moshi("transcribe", "--url", server.base, wav, "-f", "jsonl")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert len(_jsonl_words(local.stdout)) >= 5
    assert _jsonl_words(remote.stdout) == _jsonl_words(local.stdout)
    # The default output: the words as they come, as locally.
    printed = moshi("transcribe", "--url", server.base, wav)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == moshi("transcribe", "--model", server.folder, wav).stdout


def test_streams_at_once_get_what_they_get_alone_and_one_more_is_refused(server):
    inputs = [kyutai_audio(2.0 + i, seed=10 + i) for i in range(SLOTS)]
    alone = [asyncio.run(kyutai_client(server.url, pcm))[0] for pcm in inputs]

    async def together():
        clients = [asyncio.create_task(kyutai_client(server.url, pcm)) for pcm in inputs]
        while server.service.free_slots():
            await asyncio.sleep(0.01)
        extra = await kyutai_client(server.url, inputs[0])
        return await asyncio.gather(*clients), extra

    results, (_, refused) = asyncio.run(together())
    assert [words for words, _ in results] == alone
    assert all(len(words) >= 3 for words in alone)
    assert refused == [{"type": "Error", "message": NO_FREE_CHANNELS}]


def test_a_malformed_message_ends_that_connection_only(server):
    pcm = kyutai_audio(2.0, seed=20)
    alone = asyncio.run(kyutai_client(server.url, pcm))[0]

    async def bad():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url) as ws:
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
                await ws.send_bytes(b"\xc1 not msgpack")
                replies = []
                async for message in ws:
                    replies.append(msgpack.unpackb(message.data))
                return replies, ws.close_code

    async def both():
        return await asyncio.gather(kyutai_client(server.url, pcm), bad())

    (words, _), (replies, code) = asyncio.run(both())
    assert words == alone
    assert replies[-1]["type"] == "Error" and "msgpack" in replies[-1]["message"]
    assert code is not None


CLIENT = """
import asyncio, sys, aiohttp, msgpack
async def main():
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(sys.argv[1]) as ws:
            while True:
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [0.1] * 1920}))
                print("sent", flush=True)
                await asyncio.sleep(0.08)
asyncio.run(main())
"""


def test_a_killed_client_frees_its_slot(server):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        client.stdout.readline()
        deadline = time.monotonic() + 30
        while server.service.free_slots() == SLOTS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.service.free_slots() == SLOTS - 1
    finally:
        client.kill()
        client.wait()
    deadline = time.monotonic() + 5
    while server.service.free_slots() < SLOTS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.service.free_slots() == SLOTS
