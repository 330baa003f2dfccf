"""Transcription on a server: a stream's audio to ``/api/asr-streaming``, its timed words back.

Speaks the protocol of Kyutai's Rust ``moshi-server`` (and of ``moshi serve``): ``Audio`` messages
of one frame each, sent ahead of the server by at most ``AHEAD_SECONDS`` (counted by its ``Step``
answers, one a frame, or by the clock where a server sends none); at the end a ``Marker``, then
silence until the marker comes back, as Kyutai's scripts flush a file. Words go to the same
listeners (writers, printers) as a local transcription. Torch-free; numpy for the audio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from audio import FRAME_SIZE, SAMPLE_RATE

from ..stt.words import END_OF_TURN_HEAD, END_OF_TURN_THRESHOLD, Segment, TranscriptListener, Word
from ..wire import Asr, asr_message, parse_asr
from .connect import RemoteError

if TYPE_CHECKING:
    import aiohttp

AHEAD_SECONDS = 2.0  # audio sent that the server has not stepped yet, at most
FLUSH_LIMIT_SECONDS = 60.0  # silence sent after the end marker before giving up on its echo
END_MARKER = 0
POLL_SECONDS = 0.02  # how often a sender that is far enough ahead looks again

Reader = Callable[[], Awaitable[np.ndarray | None]]  # the next block of 24 kHz mono audio; None at the end


@dataclass
class RemoteStats:
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    frames: int = 0  # frames the server stepped for this stream

    @property
    def real_time_factor(self) -> float:
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")


class ServerWords:
    """The server's ``Word``, ``EndWord`` and ``Step`` messages as words and segments for a listener.

    A word without its ``EndWord`` ends where the next one starts (Kyutai's server sends the end of
    the last word before a silence only when speech resumes). Segments break where the VAD heads
    predicted an end of turn between two words, or where a word starts ``pause_seconds`` after
    the previous one ended: the protocol carries words, not the model's padding.
    """

    def __init__(self, listener: TranscriptListener, pause_seconds: float):
        self.listener = listener
        self.pause_seconds = pause_seconds
        self._open: Word | None = None
        self._segment: list[Word] = []
        self._turn: float | None = None  # highest P(end of turn) since the last word

    def word(self, text: str, start: float) -> None:
        self._close(start)
        self._open = Word(text, start, start)

    def end_word(self, stop: float) -> None:
        self._close(stop)

    def step(self, prs: list[float]) -> None:
        if len(prs) > END_OF_TURN_HEAD:
            p = prs[END_OF_TURN_HEAD]
            self._turn = p if self._turn is None else max(self._turn, p)

    def finish(self, complete: bool, duration: float) -> None:
        if self._open is not None:
            self._close(self._open.start)
        if self._segment:
            self.listener.on_segment(Segment(self._segment, "end", self._turn))
            self._segment = []
        self.listener.on_end(complete, duration)

    def _close(self, end: float) -> None:
        word, self._open = self._open, None
        if word is None:
            return
        word.end = max(word.start, end)
        if self._segment:
            reason = None
            if self._turn is not None and self._turn > END_OF_TURN_THRESHOLD:
                reason = "end_of_turn"
            elif word.start - self._segment[-1].end >= self.pause_seconds:
                reason = "pause"
            if reason is not None:
                self.listener.on_segment(Segment(self._segment, reason, self._turn))
                self._segment = []
        self.listener.on_word(word)
        self._segment.append(word)
        self._turn = None


async def transcribe_stream(ws: aiohttp.ClientWebSocketResponse, read: Reader, listener: TranscriptListener,
                            pause_seconds: float, name: str = "the server") -> RemoteStats:
    """One stream on an open websocket, to the end of ``read``'s audio and the end marker's echo.
    The listener hears ``on_end`` in every case; a refused slot, a server error or a lost connection
    is a `RemoteError` after it."""
    words = ServerWords(listener, pause_seconds)
    stats = RemoteStats()
    ready = asyncio.get_running_loop().create_future()
    echoed = False
    begun = time.monotonic()

    async def send() -> None:
        await ready
        sent = 0

        async def frame(pcm: np.ndarray) -> None:
            nonlocal sent
            while True:
                # Counted by the server's steps, or by the clock until the first one (or from a server without them).
                done = stats.frames * FRAME_SIZE if stats.frames else (time.monotonic() - begun) * SAMPLE_RATE
                if sent - done < AHEAD_SECONDS * SAMPLE_RATE:
                    break
                await asyncio.sleep(POLL_SECONDS)
            await ws.send_bytes(asr_message(Asr.AUDIO, pcm=pcm.tolist()))
            sent += len(pcm)

        pending = np.zeros(0, np.float32)
        while (block := await read()) is not None:
            stats.audio_seconds += len(block) / SAMPLE_RATE
            pending = np.concatenate([pending, np.asarray(block, np.float32).reshape(-1)])
            while len(pending) >= FRAME_SIZE:
                await frame(pending[:FRAME_SIZE])
                pending = pending[FRAME_SIZE:]
        if len(pending):
            await frame(pending)
        await ws.send_bytes(asr_message(Asr.MARKER, id=END_MARKER))
        silence = np.zeros(FRAME_SIZE, np.float32)
        for _ in range(int(FLUSH_LIMIT_SECONDS * SAMPLE_RATE / FRAME_SIZE)):
            await frame(silence)

    async def receive() -> None:
        async for message in ws:
            if message.type.name != "BINARY":
                if message.type.name in ("CLOSE", "CLOSING", "CLOSED", "ERROR"):
                    break
                continue
            try:
                kind, fields = parse_asr(message.data)
            except ValueError as exc:
                raise RemoteError(f"{name} does not speak the asr-streaming protocol: {exc}") from None
            if kind is Asr.READY and not ready.done():
                ready.set_result(None)
            elif kind is Asr.STEP:
                stats.frames += 1
                words.step(fields.get("prs") or [])
            elif kind is Asr.WORD:
                words.word(str(fields.get("text", "")), float(fields.get("start_time", 0.0)))
            elif kind is Asr.END_WORD:
                words.end_word(float(fields.get("stop_time", 0.0)))
            elif kind is Asr.MARKER and fields.get("id") == END_MARKER:
                nonlocal echoed
                echoed = True
                return
            elif kind is Asr.ERROR:
                raise RemoteError(f"{name}: {fields.get('message', 'error')}")
        raise RemoteError(f"{name} closed the connection before the end of the transcript")

    sender, receiver = asyncio.create_task(send()), asyncio.create_task(receive())
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if not receiver.done():
            if sender.exception() is not None:
                raise sender.exception()  # the input could not be read, or the connection broke
            try:
                await asyncio.wait_for(receiver, 10.0)
            except asyncio.TimeoutError:
                raise RemoteError(f"{name} did not answer the end of the audio") from None
        receiver.result()
    except (ConnectionError, OSError) as exc:
        raise RemoteError(f"lost the connection to {name}: {exc}") from None
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        stats.wall_seconds = time.monotonic() - begun
        words.finish(echoed, stats.audio_seconds)
    return stats
