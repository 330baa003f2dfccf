"""A conversation with a model on a server: the `Engine` (engine/interface.py) over Kyutai's ``/api/chat``.

The websocket lives in a thread of its own with its own asyncio loop; the session's side
(`send_frame`, `poll`) never waits on the network. Audio goes both ways as one Ogg/Opus stream per
direction (sphn, the reference server's own codec); the server's voice is decoded and cut again
into 80 ms frames.

How answers map onto frames. The protocol has none: the server steps the model once per 80 ms of
audio it receives and sends that step's voice and text piece, except for its first step, which has
nothing to say yet (the model's output runs one step behind its input). So the k-th frame of voice
the server sends (from 1) answers our k-th frame, and our frame 0 is answered here, at once, with
silence, as a local runner answers a live chat's first frame. That keeps the `Engine` contract,
one `Output` per accepted frame and in order, which the session's frame clock, recording and lag
bound (frames in flight) rest on. A server that drops audio (a busy one may) would leave frames
unanswered for ever: a frame waiting `LOST_AFTER_S` is answered with silence and counted as skipped.

Kyutai's servers (Python and Rust) send a step's voice, then its text piece, if any, at once. So a
frame of voice waits up to `TEXT_GRACE_S` for a piece that follows it, and is handed on as soon as
one does; a piece that comes later (a slow network, or a server that sends text first) goes to the
next frame: the words are the same, shown 80 ms later. The wait is the only delay this client adds
to the server's voice, and only for the frames without text. The last frame has no next one: at
the end of a run, `tail` waits for the server to fall quiet and gives what came after it.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np

from audio import FRAME_S, SAMPLE_RATE
from audio.lag import MAX_IN_FLIGHT_FRAMES

from .. import wire
from ..interface import USER_WORDS, Described, EngineEvent, Failed, Loading, Output, Ready
from ..options import ModelOptions, SeeOptions
from .connect import RemoteError, Server

# Said when the server has taken the connection but not greeted it yet: Kyutai's Python server
# talks with one client at a time and keeps the others waiting.
WAITING_NOTICE_S = 3.0
WAITING = "waiting for a server slot"
# How long a frame of the server's voice waits for a text piece that may follow it.
TEXT_GRACE_S = 0.003
# A frame the server has not answered in this time, it will not answer (it dropped the audio).
LOST_AFTER_S = 5.0
# Frames in flight and not a word from the server for this long: it is gone (as Kyutai's web client decides).
SILENT_LIMIT_S = 10.0
# The end of a run: the server has sent all it will once it is quiet this long (it sends a step's
# text right after its voice), or after TAIL_LIMIT_S whatever it does.
TAIL_QUIET_S = 0.5
TAIL_LIMIT_S = 5.0


def chat_query(options: ModelOptions) -> dict[str, object]:
    """The sampling settings the user gave, as Kyutai's web client puts them in the URL (servers
    that do not read them use their own); `moshi see` adds when the model starts looking."""
    query: dict[str, object] = {name: getattr(options, field) for name, field in wire.SAMPLING_QUERY.items()}
    query.update({name: options.seed for name in wire.SEED_QUERY})
    if isinstance(options, SeeOptions):
        query[wire.XA_START_QUERY] = wire.DEFAULT_XA_START if options.xa_start is None else options.xa_start
    return query


def model_name(metadata: dict) -> str | None:
    """The model a server's metadata names: ours say "model"; Kyutai's Rust backend, its weights' file."""
    for key in ("model", "lm_model_file", "instance_name"):
        if isinstance(metadata.get(key), str) and metadata[key]:
            return Path(metadata[key]).name if key == "lm_model_file" else metadata[key]
    return None


class RemoteEngine:
    """The ``Engine`` whose model runs on a server. Not thread-safe: one thread sends and polls
    (the engine's own thread only talks to the server)."""

    def __init__(self, server: Server, query: dict[str, object] | None = None, image: bytes | None = None,
                 *, max_in_flight: int = MAX_IN_FLIGHT_FRAMES) -> None:
        """`image`: a picture file's bytes, sent first (MoshiVis)."""
        self.server = server
        self.query = dict(query or {})
        self.max_in_flight = self._base_in_flight = max_in_flight
        self.skipped = 0
        self.state = "connecting"  # connecting, live, failed, closed
        self.info: dict[str, str] = {"model": "?", "server": server.shown, USER_WORDS: "off"}
        self._image = image
        self._ready = False
        self._generation = 0  # one per connection: what an older one says is dropped
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # the engine thread's reports, (generation, kind, ...)
        self._local: list[EngineEvent] = [Loading(f"connecting to {server.shown}")]
        self._in_flight: deque[float] = deque()
        self._late = ""  # text that came after its frame was handed on: it goes with the next frame
        self._last_heard = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="moshi-remote", daemon=True)
        self._thread.start()
        self._task = None
        self._connect()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the session's side --------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def send_frame(self, pcm: np.ndarray) -> bool:
        if self.state != "live":
            return False
        if len(self._in_flight) >= self.max_in_flight:
            self.skipped += 1
            return False
        data = self._writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
        if self._next_index == 0:
            self._local.append(Output(0, None, None, {"roundtrip": 0.0}))  # see the module's docstring
            self._answered = 1
        else:
            self._in_flight.append(time.monotonic())
        self._next_index += 1
        if data:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, wire.message(wire.Kind.AUDIO, data))
        return True

    def poll(self, timeout: float = 0.0) -> list[EngineEvent]:
        if self.state in ("failed", "closed"):
            return []
        events, self._local = self._local, []
        try:
            if not events and timeout > 0:
                events += self._take(self._inbox.get(timeout=timeout))
            while True:
                events += self._take(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if self.state == "live":
            events += self._health()
        if any(isinstance(event, Failed) for event in events):
            self._disconnect()
            self.state = "failed"
            events = events[:next(i for i, e in enumerate(events) if isinstance(e, Failed)) + 1]
        return events

    def reset(self) -> None:
        """A new conversation: the protocol has no other way than a new connection."""
        if self.state == "live":
            self._connect()

    def tail(self) -> str:
        """The end of a run, every frame answered: the text the server sent after the last frame was
        handed on, once it has been quiet `TAIL_QUIET_S` (at most `TAIL_LIMIT_S`)."""
        limit = time.monotonic() + TAIL_LIMIT_S
        while self.state == "live" and time.monotonic() < limit:
            wait = TAIL_QUIET_S - (time.monotonic() - self._last_heard)
            if wait <= 0:
                break
            try:
                for event in self._take(self._inbox.get(timeout=wait)):
                    if isinstance(event, Failed):  # the server closed: all it said has come
                        self.state = "failed"
            except queue.Empty:
                break
        late, self._late = self._late, ""
        return late

    def set_image(self, data: bytes, name: str) -> None:
        """A new picture: a new connection that sends it first."""
        if self.state == "live":
            self._image = data
            self._connect()

    def close(self) -> None:
        if self.state == "closed":
            return
        self._disconnect()
        self.state = "closed"
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()

    # -- internals -------------------------------------------------------------------------

    def _connect(self) -> None:
        import sphn

        self._disconnect()
        self._generation += 1
        self.state = "connecting"
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)  # one Ogg stream per connection
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()  # bound to the engine's loop on first use
        self._in_flight.clear()
        self._next_index = self._answered = 0
        self._late = ""
        self._task = asyncio.run_coroutine_threadsafe(
            _converse(self.server, self.query, self._image, self._outbox, self._reporter(self._generation)),
            self._loop)

    def _reporter(self, generation: int):
        return lambda *report: self._inbox.put((generation, *report))

    def _disconnect(self) -> None:
        """End the current connection (its websocket closed properly, at most a second)."""
        task, self._task = self._task, None
        if task is None or task.done():
            return

        async def cancel() -> None:  # the connection and its sender: the only other tasks of this loop
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for other in others:
                other.cancel()
            if others:
                await asyncio.wait(others, timeout=1.0)

        try:
            asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(2.0)
        except Exception:  # noqa: BLE001 - a connection that will not end is left to the daemon thread
            pass

    def _take(self, report: tuple) -> list[EngineEvent]:
        generation, kind, *rest = report
        if generation != self._generation:
            return []  # a connection since replaced
        self._last_heard = time.monotonic()
        if kind == "connected":
            # Frames in flight include the network's round trip: a far server gets room for it.
            self.max_in_flight = self._base_in_flight + math.ceil(rest[0] / FRAME_S)
            return []
        if kind == "waiting":
            return [Loading(WAITING)]
        if kind == "handshake":
            self.state = "live"
            if self._ready:
                return []  # a new conversation on a new connection: the session is live already
            self._ready = True
            return [Ready(dict(self.info))]
        if kind == "metadata":
            name = model_name(rest[0])
            if name is None:
                return []
            self.info["model"] = name
            return [Described(dict(self.info))] if self._ready else []  # else Ready will carry it
        if kind == "text":
            self._late += rest[0]
            return []
        if kind == "frame":
            pcm, text, gate, at = rest
            if not self._in_flight:
                return []  # more voice than frames sent: nothing to answer
            sent = self._in_flight.popleft()
            index, self._answered = self._answered, self._answered + 1
            text, self._late = (self._late + (text or "")) or None, ""
            return [Output(index, pcm, text, {"roundtrip": (at - sent) * 1000}, gate)]
        if kind == "failed":
            return [Failed(*rest)]
        raise RemoteError(f"unexpected report from the connection: {kind!r}")

    def _health(self) -> list[EngineEvent]:
        now = time.monotonic()
        if self._in_flight and now - self._last_heard > SILENT_LIMIT_S:
            return [Failed(f"{self.server.shown} stopped answering (silent for {now - self._last_heard:.0f} s)")]
        events: list[EngineEvent] = []
        while self._in_flight and now - self._in_flight[0] > LOST_AFTER_S:
            sent = self._in_flight.popleft()
            self.skipped += 1
            index, self._answered = self._answered, self._answered + 1
            events.append(Output(index, None, None, {"roundtrip": (now - sent) * 1000}))
        return events


# -- the engine thread's side ----------------------------------------------------------------


async def _converse(server: Server, query: dict, image: bytes | None, outbox: asyncio.Queue, report) -> None:
    """One connection: the picture first (MoshiVis), the handshake, then audio both ways until it
    ends. Everything is told through `report`; nothing raises."""
    import aiohttp

    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await server.connect(session, query)
            report("connected", time.monotonic() - started)
            sender = asyncio.create_task(_send(ws, outbox))
            try:
                if image is not None:
                    await ws.send_bytes(wire.message(wire.Kind.IMAGE, image))
                reason = await _receive(ws, report)
            finally:
                sender.cancel()
                await ws.close()
            report("failed", reason)
    except RemoteError as exc:
        report("failed", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the session must hear of every failure
        report("failed", f"the connection to {server.shown} failed: {type(exc).__name__}: {exc}",
               traceback.format_exc())


async def _send(ws, outbox: asyncio.Queue) -> None:
    while True:
        await ws.send_bytes(await outbox.get())


async def _receive(ws, report) -> str:
    """Read the server until the connection ends; the reason it ended, for the user."""
    import aiohttp
    import sphn

    from ..stt.transcription import Framer

    waiting = asyncio.get_running_loop().call_later(WAITING_NOTICE_S, report, "waiting")
    decoder, framer = sphn.OpusStreamReader(SAMPLE_RATE), Framer()
    held: np.ndarray | None = None  # a frame of voice waiting TEXT_GRACE_S for its text
    greeted = False

    def answer(frame: np.ndarray, text: str | None = None, gate: float | None = None) -> None:
        report("frame", frame, text, gate, time.monotonic())

    try:
        while True:
            try:
                msg = await ws.receive(timeout=TEXT_GRACE_S if held is not None else None)
            except asyncio.TimeoutError:
                answer(held)
                held = None
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                if held is not None:
                    answer(held)
                why = f" ({msg.extra})" if msg.type == aiohttp.WSMsgType.CLOSE and msg.extra else ""
                return f"the server closed the connection{why}"
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            parsed = wire.parse(msg.data)
            if parsed is None:
                continue  # a kind this protocol does not define: discarded, as the protocol says
            kind, payload = parsed
            if kind == wire.Kind.HANDSHAKE:
                if not greeted:  # either form: the payload (Rust's versions) says nothing we need
                    greeted = True
                    waiting.cancel()
                    report("handshake")
            elif kind == wire.Kind.ERROR:
                return f"the server says: {payload.decode(errors='replace').strip()}"
            elif kind == wire.Kind.METADATA:
                try:
                    metadata = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(metadata, dict):
                    report("metadata", metadata)
            elif kind in (wire.Kind.TEXT, wire.Kind.COLORED_TEXT):
                gate = None
                if kind == wire.Kind.TEXT:
                    piece = payload.decode(errors="replace")
                else:
                    colour, piece = wire.parse_colored_text(payload)
                    gate = wire.colour_gate(colour)
                if held is not None:
                    answer(held, piece, gate)
                    held = None
                else:  # its frame is gone: the engine gives it to the next one, or to `tail`
                    report("text", piece)
            elif kind == wire.Kind.AUDIO and greeted:
                frames = framer.push(decoder.append_bytes(payload))
                if len(frames) and held is not None:
                    answer(held)
                    held = None
                for frame in frames[:-1]:
                    answer(frame.copy())
                if len(frames):
                    held = frames[-1].copy()
    finally:
        waiting.cancel()
