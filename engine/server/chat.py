"""``/api/chat``: Moshi and MoshiVis conversations in Kyutai's protocol, several stepped as one batch.

Each session holds one slot of the batch. Its websocket reader decodes the client's Ogg/Opus and
cuts it into 1920-sample frames as Kyutai's server does; its sender encodes the model's voice into
one Ogg/Opus stream and sends each step's audio, then its text piece. The model runs in one thread
(``Stepper``): a step takes one frame from every slot whose client has sent one, so the event loop
only moves bytes.

Bounds: a client's unread frames wait in a short inbox (the reader stops reading while it is full,
so TCP holds the rest back); what the model said waits in a short outbox, the oldest step dropped
and counted when a client stops reading. A step takes whatever frames have come: a conversation
whose client has sent nothing new is held (``Hold``), so it neither waits for the others nor makes
them wait, and each gets what it would get alone.

Sampling: the checkpoint's (or the server's options) for every slot, unless a client asks for its
own in the query string, as Kyutai's web client does; then its slot is sampled its own way from
generators of its own (seeded as asked), so that neither its tokens nor the others' depend on who
shares the batch. A query that cannot be read is refused before the websocket opens.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import sphn
import torch
from aiohttp import WSMsgType, web

from audio import FRAME_SIZE, SAMPLE_RATE

from .. import wire
from ..moshi.generate import Sampling, SlotSampling
from ..moshi.model import UNGENERATED_TOKEN
from ..moshivis.vision import open_image
from ..runner import BaseRunner, FirstFrame, Models
from ..streaming import StreamingModule
from .app import SessionStats
from .metrics import ServiceMetrics

log = logging.getLogger("moshi.serve")

INBOX_FRAMES = 8  # 640 ms of the client's audio decoded and not stepped yet
OUTBOX_STEPS = 25  # 2 s of the model's answer not sent yet: then the oldest step goes
SEND_BACKLOG_BYTES = 16 << 10  # sent and not taken by the kernel yet: then the sender waits
BACKLOG_POLL_S = 0.01
PICTURE_TIMEOUT_S = 30.0  # MoshiVis: the picture must come first, and soon
# Kyutai's server sends every text token but these two (0, and 3, the padding), as its piece.
UNSENT_TOKENS = (0, 3)
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit numbers, as in Kyutai's Rust server


@dataclass
class Asked:
    """The sampling a client asked for in its query string."""

    sampling: Sampling
    seeds: tuple[int | None, int | None]  # text, audio; None: a random one


def asked_sampling(query: Mapping[str, str], default: Sampling) -> Asked | None:
    """What the query asks of sampling, under Kyutai's names, over `default` (None: nothing asked).
    A malformed or out-of-range value raises ValueError with what to say to the client."""
    fields: dict[str, float | int] = {}
    for name, field_name in wire.SAMPLING_QUERY.items():
        if name in query:
            fields[field_name] = (
                _value(query, name, float, "a number from 0 (greedy) up", lambda v: math.isfinite(v) and v >= 0)
                if field_name.startswith("temp") else
                _value(query, name, int, "a whole number from 0 (every token) up", lambda v: v >= 0))
    seeds = tuple(None if name not in query else
                  _value(query, name, int, f"a whole number from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)
                  for name in wire.SEED_QUERY)
    for name, neutral in wire.NEUTRAL_QUERY.items():
        if name in query and _value(query, name, float, f"{neutral:g}", lambda v: True) != neutral:
            raise ValueError(f"this server does not apply {name}: leave it out, or {neutral:g}")
    if not fields and seeds == (None, None):
        return None
    return Asked(Sampling(**{**default.__dict__, **fields}), seeds)


def _value(query: Mapping[str, str], name: str, kind: type, what: str, fits: Callable[[Any], bool]):
    try:
        value = kind(query[name])
    except ValueError:
        value = None
    if value is None or not fits(value):
        raise ValueError(f"{name} must be {what}, not {query[name]!r}")
    return value


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed, as Kyutai's server picks when none is given
    else:
        generator.manual_seed(seed)
    return generator


@dataclass
class Answer:
    """What the model said to one slot in one step."""

    pcm: np.ndarray | None
    text: str | None
    colour: int | None = None  # MoshiVis: the gate's colour for the text
    error: str | None = None  # the model failed: the session ends with this message


@dataclass
class Slot:
    """One conversation's place in the batch; the stepper and the session share it under the lock."""

    index: int
    deliver: Callable[[Answer], None]  # thread-safe: hands an answer to the session's loop
    freed: Callable[[], None]  # thread-safe: wakes a reader waiting for room in the inbox
    inbox: collections.deque = field(default_factory=collections.deque)
    picture: Any = None  # MoshiVis: the PIL picture, embedded by the stepper before the first frame
    xa_start: int | None = None  # MoshiVis: the client's step to look at the picture from (None: the model's)
    asked: Asked | None = None  # the client's own sampling (None: the server's)
    started: bool = False  # its first frame was stepped (the slot was reset just before)
    ready: asyncio.Future | None = None  # set when the picture is embedded


class Stepper:
    """The batch of conversations, stepped in a thread of its own."""

    def __init__(self, models: Models, batch_size: int, vision: bool, metrics: ServiceMetrics):
        first_frame = FirstFrame.KYUTEYE_SERVER if vision else FirstFrame.SERVER
        self.runner = BaseRunner(models, first_frame, batch_size)
        if vision:  # the step from which each slot looks at its picture: its client's, else the checkpoint's
            self.xa_start = models.model.cfg.xa_start
            self.runner.gen.xa_start = torch.full((batch_size,), self.xa_start, device=self.runner.device)
        self.models = models
        self.batch_size = batch_size
        self.vision = vision
        self.metrics = metrics
        self.slots: list[Slot | None] = [None] * batch_size
        self.cond = threading.Condition()
        self.stopping = False
        self.failure: str | None = None  # why the model stopped stepping, for good
        self.thread = threading.Thread(target=self._run, name="moshi-stepper", daemon=True)
        self.input_codebooks = models.lm.cfg.n_q - models.lm.cfg.dep_q
        self._images: torch.Tensor | None = None  # MoshiVis: [B, N, dim], each slot's picture
        self.hold = Hold([models.mimi, self.runner.gen])

    # -- the session side (event loop) --

    def take(self, make: Callable[[int], Slot]) -> Slot | None:
        with self.cond:
            for index, slot in enumerate(self.slots):
                if slot is None:
                    self.slots[index] = make(index)
                    self.cond.notify()
                    return self.slots[index]
        return None

    def leave(self, slot: Slot) -> None:
        with self.cond:
            if self.slots[slot.index] is slot:
                self.slots[slot.index] = None

    def put(self, slot: Slot, frame: np.ndarray) -> bool:
        """False when the inbox is full (the caller waits for `freed`)."""
        with self.cond:
            if len(slot.inbox) >= INBOX_FRAMES:
                return False
            slot.inbox.append(frame)
            self.cond.notify()
            return True

    def free(self) -> int:
        with self.cond:
            return 0 if self.failure else sum(slot is None for slot in self.slots)

    def start(self) -> None:
        self.warmup()
        self.thread.start()

    @torch.no_grad()
    def warmup(self, steps: int = 4) -> None:
        """A few steps of silence in every slot, then all start over: the first session's first
        steps are then as fast as the others."""
        for _ in range(steps):
            self.runner.submit(np.zeros((self.batch_size, FRAME_SIZE), dtype=np.float32))
            out = self.runner.gen.step_full(self.runner.encoder.collect()[:, :self.input_codebooks])
            if out.tokens is not None:
                self.models.mimi.decode(out.tokens[:, 1:].clamp(min=0))
        self.runner.encoder.reset()
        self.runner.gen.reset_streaming()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()
        self.runner.close()

    # -- the stepper thread --

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self.cond:
                    batch = self._gather()
                    if batch is None:
                        return
                    pictures = [s for s in self.slots if s is not None and s.picture is not None and s.ready is not None]
                for slot in pictures:
                    self._embed(slot)
                if batch:
                    self._step(batch)
        except Exception as exc:  # noqa: BLE001 - whatever the model raised ends every session, told why
            log.exception("the model failed; no more sessions")
            with self.cond:
                self.failure = f"the model failed on the server: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                for slot in self._live():
                    slot.deliver(Answer(None, None, error=self.failure))
                    slot.freed()
                    if slot.ready is not None:
                        ready = slot.ready
                        ready.get_loop().call_soon_threadsafe(lambda r=ready: r.done() or r.set_result(None))

    def _gather(self) -> dict[int, tuple[Slot, np.ndarray]] | None:
        """Under the lock: wait for a frame, then take one from each slot that has one."""
        while not self.stopping:
            live = self._live()
            if any(s.picture is not None and s.ready is not None for s in live):
                return {}
            batch = {}
            for slot in live:
                if slot.inbox:
                    batch[slot.index] = (slot, slot.inbox.popleft())
                    slot.freed()
            if batch:
                return batch
            self.cond.wait()
        return None

    def _live(self) -> list[Slot]:
        return [s for s in self.slots if s is not None]

    def _embed(self, slot: Slot) -> None:
        embedded = self.models.model.embed_image(slot.picture)
        if self._images is None:
            self._images = embedded.new_zeros((self.batch_size, *embedded.shape[1:]))
        self._images[slot.index] = embedded[0]
        self.runner.gen.set_cross_source(self._images)  # the layers' keys and values, computed once
        with self.cond:
            slot.picture = None
        ready, slot.ready = slot.ready, None
        ready.get_loop().call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))

    def _step(self, batch: dict[int, tuple[Slot, np.ndarray]]) -> None:
        begun = time.perf_counter()
        runner, device = self.runner, self.runner.device
        pcm = np.zeros((self.batch_size, FRAME_SIZE), dtype=np.float32)
        fresh = torch.zeros(self.batch_size, dtype=torch.bool)
        for index, (slot, frame) in batch.items():
            pcm[index] = frame
            if not slot.started:
                fresh[index] = slot.started = True
        held = torch.tensor([s is not None and s.started and s.index not in batch for s in self.slots])
        hold = self.hold.keep(held.to(device)) if held.any() else None
        self.metrics.holds.inc(int(held.sum()))
        own = runner.gen.slot_sampling
        for index in [index for index in own if self.slots[index] is None]:
            del own[index]  # its client left
        if fresh.any():  # a new conversation in these slots, the others going on
            runner.encoder.reset(fresh)
            runner.gen.reset_streaming(fresh)
            for index in fresh.nonzero()[:, 0].tolist():
                slot = self.slots[index]
                if self.vision:
                    runner.gen.xa_start[index] = self.xa_start if slot.xa_start is None else slot.xa_start
                if slot.asked is None:
                    own.pop(index, None)
                else:
                    text_seed, audio_seed = slot.asked.seeds
                    own[index] = SlotSampling(slot.asked.sampling, _generator(text_seed, device),
                                              _generator(audio_seed, device))
        # A held slot's step is undone, its own draws included.
        draws = [(own[i], own[i].text.get_state(), own[i].audio.get_state()) for i in own if held[i]]
        runner.submit(pcm)
        codes = runner.encoder.collect()
        if fresh.any() and runner.first_frame is FirstFrame.SERVER:
            # Kyutai's server encodes a conversation's frame 0, then starts Mimi over for frame 1.
            runner.encoder.reset(fresh)
        out = runner.gen.step_full(codes[:, :self.input_codebooks])
        answers: dict[int, Answer] = {}
        if out.tokens is not None:
            tokens = out.tokens
            spoke = tokens[:, 0, 0] != UNGENERATED_TOKEN
            audio = self.models.mimi.decode(torch.where(spoke[:, None, None], tokens[:, 1:], 0))
            # A slot with nothing to say yet must not have decoded anything: its decoder starts over.
            silent = (~spoke).to(device)
            if silent.any():
                mimi = self.models.mimi
                for part in (mimi.upsample, mimi.decoder_transformer, mimi.decoder):
                    _reset_tree(part, silent)
            audio = audio[:, 0].float().cpu().numpy()
            texts = tokens[:, 0, 0].tolist()
            gates = out.gate.float().cpu().tolist() if out.gate is not None else None
            for index in batch:
                if not bool(spoke[index]):
                    continue
                token = texts[index]
                piece = None if token in UNSENT_TOKENS else self.models.tokenizer.id_to_piece(token).replace("▁", " ")
                colour = wire.gate_colour(gates[index]) if gates is not None else None
                answers[index] = Answer(audio[index], piece, colour)
        if hold is not None:
            hold.restore()
        for sampling, text_state, audio_state in draws:
            sampling.text.set_state(text_state)
            sampling.audio.set_state(audio_state)
        elapsed = time.perf_counter() - begun
        self.metrics.step_seconds.observe(elapsed)
        self.metrics.frames.inc(len(batch))
        for index, (slot, _) in batch.items():
            slot.deliver(answers.get(index, Answer(None, None)))


class Hold:
    """Steps a batch as if some slots were not in it: what a step changes of their streaming state
    is put back afterwards. The rings (attention caches, the generator's token ring) need only
    their slot's offset put back: the step wrote where the next one will write again, and dropped
    only what lies beyond the attention span."""

    RINGS = {("KVCacheState", "cache"), ("GenState", "cache"), ("CrossAttentionState", "keys"),
             ("CrossAttentionState", "values")}

    def __init__(self, trees: list[torch.nn.Module]):
        self.modules = [m for tree in trees for m in tree.modules() if isinstance(m, StreamingModule)]
        self.saved: list[tuple[Any, str, torch.Tensor]] = []
        self.mask: torch.Tensor | None = None

    def keep(self, mask: torch.Tensor) -> Hold:
        self.mask = mask
        self.saved = []
        for module in self.modules:
            state = module.state
            for name in getattr(state, "__dataclass_fields__", ()):
                value = getattr(state, name)
                if isinstance(value, torch.Tensor) and (type(state).__name__, name) not in self.RINGS:
                    self.saved.append((state, name, value.clone()))
        return self

    def restore(self) -> None:
        for state, name, before in self.saved:
            now = getattr(state, name)
            mask = self.mask.view(-1, *([1] * (now.dim() - 1)))
            now.copy_(torch.where(mask, before, now))
        self.saved = []


def _reset_tree(module: torch.nn.Module, mask: torch.Tensor) -> None:
    """Start these slots over in every streaming part of `module` (Mimi's decoder, without its encoder)."""
    for part in module.modules():
        if isinstance(part, StreamingModule) and part.state is not None:
            part.state.reset(mask)


class ChatService:
    """Moshi or MoshiVis at ``/api/chat``: the `Service` of `app.py`."""

    path = wire.CHAT_PATH

    def __init__(self, models: Models, batch_size: int, vision: bool):
        self.model = models.name
        self.slots = batch_size
        self.vision = vision
        self.metrics = ServiceMetrics(self.free_slots)
        self.stepper = Stepper(models, batch_size, vision, self.metrics)
        self.sessions: set[asyncio.Task] = set()
        self.sampling = models.sampling

    def free_slots(self) -> int:
        return self.stepper.free()

    def info(self) -> dict[str, Any]:
        return {"type": "MoshiVis" if self.vision else "Moshi", "sampling": self.sampling.__dict__}

    def refusal(self, request: web.Request) -> str | None:
        try:
            asked_sampling(request.query, self.sampling)
        except ValueError as exc:
            return str(exc)
        return None

    async def start(self) -> None:
        self.stepper.start()

    async def stop(self) -> None:
        if self.stepper.thread.is_alive():
            for task in list(self.sessions):
                task.cancel()
            await asyncio.gather(*self.sessions, return_exceptions=True)
            await asyncio.to_thread(self.stepper.stop)

    async def handle(self, ws: web.WebSocketResponse, request: web.Request, stats: SessionStats) -> None:
        task = asyncio.current_task()
        self.sessions.add(task)
        try:
            await Session(self, ws, request, stats).run()
        except asyncio.CancelledError:  # draining: the app closes the socket
            pass
        finally:
            self.sessions.discard(task)


class Session:
    def __init__(self, service: ChatService, ws: web.WebSocketResponse, request: web.Request, stats: SessionStats):
        self.service, self.ws, self.stats = service, ws, stats
        self.transport = request.transport
        self.request = request
        self.stepper = service.stepper
        self.metrics = service.metrics
        self.loop = asyncio.get_running_loop()
        self.outbox: collections.deque[Answer] = collections.deque()
        self.answered = asyncio.Event()
        self.room = asyncio.Event()

    def _deliver(self, answer: Answer) -> None:  # on the loop
        if len(self.outbox) >= OUTBOX_STEPS:
            self.outbox.popleft()
            self.stats.dropped += 1
            self.metrics.frames_dropped.inc()
        self.outbox.append(answer)
        self.answered.set()

    async def fail(self, message: str) -> None:
        self.stats.error = message
        self.metrics.errors.inc()
        if not self.ws.closed:
            await self.ws.send_bytes(wire.message(wire.Kind.ERROR, message.encode()))
            await self.ws.close()

    async def run(self) -> None:
        if self.stepper.failure:
            await self.fail(self.stepper.failure)
            return
        asked = asked_sampling(self.request.query, self.service.sampling)  # checked before the upgrade
        slot = self.stepper.take(lambda index: Slot(
            index, lambda answer: self.loop.call_soon_threadsafe(self._deliver, answer),
            lambda: self.loop.call_soon_threadsafe(self.room.set), asked=asked))
        if slot is None:
            self.stats.refused = True
            self.metrics.refused.inc()
            await self.ws.send_bytes(wire.message(wire.Kind.ERROR, wire.NO_FREE_CHANNELS.encode()))
            return
        self.metrics.connections.inc()
        self.metrics.sessions.inc()
        try:
            if self.service.vision and not await self._picture(slot, self.request):
                return
            await self.ws.send_bytes(wire.HANDSHAKE_PYTHON)
            # As Kyutai's Rust server does: what runs, for the client to show (Kyutai's Python
            # client logs a kind it does not know and goes on).
            sampling = self.service.sampling if asked is None else asked.sampling
            metadata = {"model": self.service.model, **self.service.info(),
                        **{name: getattr(sampling, field) for name, field in wire.SAMPLING_QUERY.items()}}
            await self.ws.send_bytes(wire.message(wire.Kind.METADATA, json.dumps(metadata).encode()))
            sender = asyncio.create_task(self._send())
            try:
                await self._receive(slot)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
        finally:
            self.stepper.leave(slot)
            self.metrics.sessions.dec()

    async def _picture(self, slot: Slot, request: web.Request) -> bool:
        """MoshiVis: the first message is the picture; the stepper embeds it before the handshake.
        The query may say from which step to look at it (`xa_start`), as Kyutai's MoshiVis server reads."""
        if wire.XA_START_QUERY in request.query:
            try:
                slot.xa_start = int(request.query[wire.XA_START_QUERY])
                if slot.xa_start < 0:
                    raise ValueError
            except ValueError:
                await self.fail(f"{wire.XA_START_QUERY} must be a step number from 0, not {request.query[wire.XA_START_QUERY]!r}")
                return False
        try:
            message = await self.ws.receive(timeout=PICTURE_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.fail("MoshiVis needs a picture first (an image message) and none came")
            return False
        parsed = wire.parse(message.data) if message.type == WSMsgType.BINARY else None
        if parsed is None or parsed[0] is not wire.Kind.IMAGE:
            await self.fail("MoshiVis needs a picture first: the first message must be an image")
            return False
        try:
            picture = await asyncio.to_thread(open_image, parsed[1])
        except Exception as exc:  # noqa: BLE001 - whatever Pillow says about bytes it cannot read
            await self.fail(f"cannot read the picture: {exc}")
            return False
        with self.stepper.cond:
            slot.ready = self.loop.create_future()
            slot.picture = picture
            self.stepper.cond.notify()
        await slot.ready
        if self.stepper.failure:
            await self.fail(self.stepper.failure)
            return False
        return True

    async def _receive(self, slot: Slot) -> None:
        reader = sphn.OpusStreamReader(SAMPLE_RATE)
        pending = np.zeros(0, dtype=np.float32)
        async for message in self.ws:
            if message.type != WSMsgType.BINARY:
                if message.type == WSMsgType.TEXT:
                    await self.fail("messages are binary: a kind byte, then its payload")
                return
            parsed = wire.parse(message.data)
            if parsed is None or parsed[0] is not wire.Kind.AUDIO:
                continue  # kinds this endpoint does not take are discarded, as the protocol says
            try:
                pcm = reader.append_bytes(parsed[1])
            except ValueError as exc:
                await self.fail(f"the audio is not an Ogg/Opus stream: {exc}")
                return
            pending = np.concatenate((pending, pcm)) if pending.size else pcm
            while pending.shape[-1] >= FRAME_SIZE:
                frame, pending = pending[:FRAME_SIZE], pending[FRAME_SIZE:]
                while not self.stepper.put(slot, frame):
                    if self.stepper.failure:
                        return
                    self.room.clear()
                    await self.room.wait()
                self.stats.frames += 1

    async def _send(self) -> None:
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        vision = self.service.vision
        while True:
            await self.answered.wait()
            self.answered.clear()
            while self.outbox:
                # A client that does not read: the answers wait in the outbox, where the oldest go.
                while self.transport is not None and self.transport.get_write_buffer_size() > SEND_BACKLOG_BYTES:
                    await asyncio.sleep(BACKLOG_POLL_S)
                answer = self.outbox.popleft()
                if answer.error is not None:
                    await self.fail(answer.error)
                    return
                if answer.pcm is not None:
                    data = writer.append_pcm(answer.pcm)
                    if data:
                        await self.ws.send_bytes(wire.message(wire.Kind.AUDIO, data))
                if answer.text is not None:
                    if vision:
                        await self.ws.send_bytes(wire.colored_text(answer.colour, answer.text))
                    else:
                        await self.ws.send_bytes(wire.message(wire.Kind.TEXT, answer.text.encode()))
