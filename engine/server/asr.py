"""``/api/asr-streaming``: Kyutai STT as a service, in the protocol of Kyutai's Rust ``moshi-server``.

Every connected stream is a slot of one batched ``TranscribeRunner``: one Mimi encode and one LM
step a frame for all of them. A stream joins at its first frame of audio (its slot alone is
reset) and leaves when its websocket closes. The batch steps once every stream taking part has a
frame; one that has none after ``grace_s`` is fed silence for that step (counted), and is not
waited for again until its audio catches up, so a stalled client never holds the others back.

The audio comes as float samples (``Audio``) or as one Ogg/Opus stream (``OggOpus``), which each
connection decodes with its own sphn reader (the Opus library of Kyutai's servers).

Words and their times are those of the local ``moshi transcribe`` for the same audio: the same
silence prefix, the same word formula. A ``Marker`` closes the transcript of the audio before it:
once the model has read that audio plus the silence ``moshi transcribe`` pads a file with (the
client sends that silence, as Kyutai's scripts do), the words still open are ended as at the end
of a file, then the marker goes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from audio import FRAME_SIZE, SAMPLE_RATE

from .. import wire
from ..stt.transcription import Framer, padding_samples
from ..stt.words import TranscriptListener, Word, WordAssembler
from ..wire import Asr, asr_message
from .app import SessionStats
from .metrics import ServiceMetrics

log = logging.getLogger("moshi.serve")

GRACE_S = 0.2  # how long a step waits for a stream's frame before feeding it silence
QUEUE_FRAMES = 125  # a stream's audio waiting for the model: 10 s; beyond, its oldest frames are dropped
OUTBOX_MESSAGES = 1000  # messages waiting for a client that does not read: beyond, it is disconnected


class _WordSender(TranscriptListener):
    """A word as Kyutai's server sends it: ``Word`` with its start, then ``EndWord`` with its end."""

    def __init__(self, stream: _Stream):
        self.stream = stream

    def on_word(self, word: Word) -> None:
        self.stream.send(asr_message(Asr.WORD, text=word.text, start_time=word.start))
        self.stream.send(asr_message(Asr.END_WORD, stop_time=word.end))


@dataclass
class _Stream:
    ws: web.WebSocketResponse
    stats: SessionStats
    framer: Framer
    words: WordAssembler | None = None
    frames: deque = field(default_factory=lambda: deque(maxlen=QUEUE_FRAMES))  # (index, frame)
    outbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(OUTBOX_MESSAGES))
    markers: deque = field(default_factory=deque)  # (index of the last frame before it is answered, id)
    samples: int = 0  # of the client's audio
    made: int = 0  # frames cut from it so far
    started: bool = False  # has taken part in a step: its slot was reset then
    underran: bool = False  # fed silence last step: not waited for until it has audio again
    fresh: bool = True  # its first step reads no audio; its output is dropped
    codes: Any = None  # of the frame submitted last step, which the LM reads this step
    reading: int | None = None  # index of that frame (None: silence fed for a missing frame)
    pending: int | None = None  # index of the frame submitted this step
    overflowed: bool = False
    opus: sphn.OpusStreamReader | None = None  # the client's Ogg/Opus stream, from its first OggOpus message

    def send(self, data: bytes) -> None:
        try:
            self.outbox.put_nowait(data)
        except asyncio.QueueFull:
            self.overflowed = True  # the session's loop sees it and closes the connection


class AsrService:
    """The ``Service`` of ``moshi serve`` with an STT model (``engine.server.app``)."""

    path = wire.ASR_PATH

    def __init__(self, runner, grace_s: float = GRACE_S):
        self.runner = runner  # engine.stt.runner.TranscribeRunner; its batch size is the number of slots
        self.model = runner.models.name
        self.slots = runner.batch_size
        self.grace_s = grace_s
        self.metrics = ServiceMetrics(self.free_slots)
        self.offset = runner.silence_prefix_seconds + runner.delay_seconds
        self.prefix, self.suffix = padding_samples(runner.silence_prefix_seconds, runner.delay_seconds)
        self._streams: list[_Stream | None] = [None] * self.slots
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moshi-asr-step")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def free_slots(self) -> int:
        return 0 if self._stopping else self._streams.count(None)

    def info(self) -> dict[str, Any]:
        return {"type": "BatchedAsr", "transcript_model": self.runner.model_info()}

    def refusal(self, request: web.Request) -> str | None:
        return None  # the protocol takes nothing from the query but the key

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        for stream in self._streams:
            if stream is not None:
                await stream.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._executor.shutdown(wait=True)

    async def handle(self, ws: web.WebSocketResponse, request: web.Request, stats: SessionStats) -> None:
        if self._stopping or None not in self._streams:
            stats.refused = True
            self.metrics.refused.inc()
            await ws.send_bytes(asr_message(Asr.ERROR, message=wire.NO_FREE_CHANNELS))
            return
        slot = self._streams.index(None)
        stream = _Stream(ws, stats, Framer(self.prefix))
        stream.words = WordAssembler(self.runner.models.tokenizer, self.offset, _WordSender(stream))
        self._streams[slot] = stream
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        sender = asyncio.create_task(self._send_loop(stream))
        stream.send(asr_message(Asr.READY))
        try:
            await self._receive_loop(stream)
        finally:
            self._streams[slot] = None
            self.metrics.sessions.dec()
            self._wake.set()  # the others may have been waiting for this one
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _receive_loop(self, stream: _Stream) -> None:
        ws = stream.ws
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                continue  # not part of the protocol; Kyutai's server skips them too
            if message.type is not WSMsgType.BINARY:
                break
            try:
                kind, fields = wire.parse_asr(message.data)
                self._take(stream, kind, fields)
            except ValueError as exc:
                await self._refuse(stream, str(exc))
                return
            if stream.overflowed:
                await self._refuse(stream, f"more than {OUTBOX_MESSAGES} messages unread: the client stopped reading")
                return

    async def _refuse(self, stream: _Stream, why: str) -> None:
        stream.stats.error = why
        self.metrics.errors.inc()
        if not stream.overflowed:
            await stream.ws.send_bytes(asr_message(Asr.ERROR, message=why))
        await stream.ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=why.encode()[:120])

    def _take(self, stream: _Stream, kind: Asr, fields: dict) -> None:
        if kind is Asr.AUDIO:
            pcm = fields.get("pcm")
            if not isinstance(pcm, list) or not all(isinstance(x, (float, int)) for x in pcm):
                raise ValueError("Audio needs pcm: a list of numbers (24 kHz mono samples)")
            self._push(stream, np.asarray(pcm, np.float32))
        elif kind is Asr.OGG_OPUS:
            data = fields.get("data")
            if isinstance(data, list) and all(isinstance(x, int) and 0 <= x < 256 for x in data):
                data = bytes(data)  # Kyutai's Rust clients may write the bytes as a list of numbers
            if not isinstance(data, bytes):
                raise ValueError("OggOpus needs data: bytes of an Ogg/Opus stream")
            # The messages of a connection, concatenated, are one stream, cut anywhere: the decoder
            # gives what the pages completed so far hold, and the framer cuts it as any audio.
            stream.opus = stream.opus or sphn.OpusStreamReader(SAMPLE_RATE)
            try:
                pcm = stream.opus.append_bytes(data)
            except ValueError as exc:
                raise ValueError(f"OggOpus data that is not an Ogg/Opus stream: {exc}") from None
            self._push(stream, pcm)
        elif kind is Asr.MARKER:
            marker = fields.get("id")
            if not isinstance(marker, int):
                raise ValueError("Marker needs id: an integer")
            # Answered after the frame that holds the last sample of the padding ``moshi transcribe``
            # puts after a file.
            last = (self.prefix + stream.samples + self.suffix) // FRAME_SIZE - 1
            stream.markers.append((last, marker))
        elif kind is not Asr.PING:
            raise ValueError(f"a client does not send {kind.value} (only Audio, OggOpus, Marker and Ping)")

    def _push(self, stream: _Stream, pcm: np.ndarray) -> None:
        stream.samples += len(pcm)
        for frame in stream.framer.push(pcm):
            if len(stream.frames) == stream.frames.maxlen:
                stream.stats.dropped += 1
                self.metrics.frames_dropped.inc()
            stream.frames.append((stream.made, frame))
            stream.made += 1
        if stream.frames:
            self._wake.set()

    async def _send_loop(self, stream: _Stream) -> None:
        while True:
            data = await stream.outbox.get()
            await stream.ws.send_bytes(data)

    # The model's side: one step of the whole batch at a time.

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready()
            streams = list(self._streams)
            fresh = [i for i, s in enumerate(streams) if s is not None and not s.started]
            pcm = np.zeros((self.slots, FRAME_SIZE), np.float32)
            taking_part = []
            for i, stream in enumerate(streams):
                if stream is None or not (stream.started or stream.frames):
                    streams[i] = None
                    continue
                stream.started = True
                taking_part.append(i)
                if stream.frames:
                    stream.underran = False
                    index, pcm[i] = stream.frames.popleft()
                else:
                    stream.underran, index = True, None  # a client behind real time: silence in its place
                stream.pending = index
            fresh = [i for i in fresh if i in taking_part]
            codes = [None if s is None else s.codes for s in streams]
            begun = time.perf_counter()
            out, new_codes = await loop.run_in_executor(self._executor, self._step, fresh, pcm, codes)
            self.metrics.step_seconds.observe(time.perf_counter() - begun)
            for i, stream in enumerate(streams):
                if stream is None or self._streams[i] is not stream:
                    continue  # left during the step
                if not stream.fresh:
                    self._token(stream, out.tokens[i], out.vad[i] if out.vad else None)
                stream.fresh = False
                stream.codes, stream.reading = new_codes[i], stream.pending
                if stream.pending is not None:
                    stream.stats.frames += 1
                    self.metrics.frames.inc()

    async def _ready(self) -> None:
        """Until a step is due: some stream has a frame, and every other one taking part has one
        too, or has fallen behind, or ``grace_s`` has passed since."""
        deadline = None
        while True:
            active = [s for s in self._streams if s is not None and (s.started or s.frames)]
            if any(s.frames for s in active):
                waiting = [s for s in active if s.started and not s.frames and not s.underran]
                if not waiting:
                    return
                now = time.monotonic()
                deadline = deadline or now + self.grace_s
                if now >= deadline:
                    return
                timeout = deadline - now
            else:
                deadline, timeout = None, None
            self._wake.clear()
            # asyncio.wait, not wait_for: wait_for can swallow a cancellation that comes as the event is set.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()

    def _step(self, fresh: list[int], pcm: np.ndarray, codes: list):
        """In the model's thread: reset the joining slots, then one frame of every slot."""
        runner = self.runner
        if fresh:
            runner.reset_slots(fresh)
        runner.submit(pcm)
        lm_codes = runner.no_codes()
        for i, c in enumerate(codes):
            if c is not None:
                lm_codes[i] = c
        out = runner.lm_step(lm_codes)
        return out, runner.collect()

    def _token(self, stream: _Stream, token: int, pause: list[float] | None) -> None:
        words = stream.words
        step = words.position
        words.push(token, pause)
        stream.send(asr_message(Asr.STEP, step_idx=step, prs=pause or [],
                                buffered_pcm=len(stream.frames) * FRAME_SIZE))
        while stream.markers and stream.reading is not None and stream.reading >= stream.markers[0][0]:
            _, marker = stream.markers.popleft()
            words.finish(True, stream.samples / SAMPLE_RATE)
            stream.words = words = WordAssembler(words.tokenizer, self.offset, words.listener)
            words.position = step + 1
            stream.send(asr_message(Asr.MARKER, id=marker))
