"""The model in its own process.

The child (multiprocessing "spawn": a fresh interpreter, no inherited threads or CUDA state) loads
a runner once, warms it up, then answers every 80 ms frame of the user's voice with one output.
The parent side, `EngineProcess`, never blocks: `send_frame` drops a frame rather than queue more
than a few, and `poll` only reads what has arrived. Failures are noticed within a second: the
child sends a heartbeat every 0.2 s, frames waiting `stall_timeout_s` without any answer count as
a stall, and a dead process is seen on the next poll. The child leaves on its own when the parent dies.

Messages on the pipe are tuples, parent → child: ("frame", index, pcm), ("reset",), ("image", data, name),
("stop",); child → parent: ("loading", text), ("warming",), ("ready", info, warm_step_s),
("out", pcm, text, timings_ms, gate, user_text, late), ("reset",), ("alive",), ("error", message, traceback).
"image" (a picture file's bytes, for a `PictureRunner`) starts a new conversation, as "reset"
does; "gate" is how much a MoshiVis runner looked at the picture that step, None for the others;
"user_text" the user's words of that frame where the runner recognises them (`StepOutput.user_text`);
"late" how many frames back the words are from (`StepOutput.late`).
What the child uses of a runner is the `Runner` protocol of engine/runner.py.
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import numpy as np

from audio.lag import MAX_IN_FLIGHT_FRAMES

from .errors import EngineError
from .interface import EngineEvent, Failed, Loading, Output, Ready, WarmingUp
from .options import Mode

if TYPE_CHECKING:  # the runners need torch, which the app's process never loads
    from .runner import Runner

# Warm steps the child times before it says it is ready: the parent scales what it calls a stall on
# the slowest. Three, since a runner with Mimi in its own process steps its LM from the second on,
# and decodes from the third. They draw from the sampler's random stream, as a conversation would.
TIMED_WARM_STEPS = 3

HEARTBEAT_S = 0.2
# A frame unanswered for this many warm step times (and at least stall_timeout_s) is a stall.
STALL_STEPS = 10


class EngineProcessError(EngineError):
    """The engine process failed to start, died, or stopped answering."""


# -- parent side ----------------------------------------------------------------------------


class EngineProcess:
    """The ``Engine`` (``engine/interface.py``) that runs the model in a child process on this
    machine. Not thread-safe: one thread sends and polls."""

    def __init__(
        self,
        runner: Mode | str,
        options: Any,
        *,
        log_path: str | None = None,
        max_in_flight: int = MAX_IN_FLIGHT_FRAMES,
        stall_timeout_s: float = 0.8,
        load_timeout_s: float = 60.0,
    ) -> None:
        """`runner`: a mode (its runner) or "package.module:Class". `options` is handed to
        `Class.load` in the child (it must pickle). The child's stdout and stderr go to
        `log_path` (default: nowhere), so they cannot scribble over the TUI."""
        modes = [mode.value for mode in Mode]
        self.runner = Mode(runner).runner if runner in modes else runner
        if ":" not in self.runner:
            raise EngineProcessError(f"unknown engine runner {runner!r}: use one of {modes} or module:Class")
        self.max_in_flight = max_in_flight
        self.stall_timeout_s = stall_timeout_s
        self.load_timeout_s = load_timeout_s  # silence allowed while loading (long C calls)
        self.state = "loading"  # loading, warming up, live, failed, closed
        self.info: dict[str, str] = {}
        self.skipped = 0  # frames dropped because the engine was behind
        self._in_flight: deque[float] = deque()  # send times of unanswered frames, oldest first
        self._next_index = 0
        self._answered = 0
        self._resets_pending = 0
        self._new_picture = False  # a picture is being looked at (seconds): no stall until it is done
        self._error: tuple[str, str] | None = None
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_child_main,
            args=(child_conn, self.runner, options, os.getpid(), log_path),
            name="moshi-engine",
            daemon=True,  # multiprocessing ends it at interpreter exit, whatever happens here
        )
        self.process.start()
        child_conn.close()
        self._last_heard = self._last_answer = time.monotonic()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def send_frame(self, pcm: np.ndarray) -> bool:
        """Queue one frame of the user's voice; False (and counted as skipped) when the engine is
        `max_in_flight` frames behind. Frames before the engine is live are refused uncounted."""
        if self.state != "live":
            return False
        if len(self._in_flight) >= self.max_in_flight:
            self.skipped += 1
            return False
        sent_at = time.monotonic()  # before sending: the child may answer before send() returns
        try:
            self._conn.send(("frame", self._next_index, np.ascontiguousarray(pcm, dtype=np.float32)))
        except OSError:
            return False  # the child is gone; the next poll reports it
        self._in_flight.append(sent_at)
        self._next_index += 1
        return True

    def reset(self) -> None:
        """Start a new conversation with the same weights. Answers to earlier frames are dropped;
        frame indices start again at 0."""
        self._start_over(("reset",))

    def set_image(self, data: bytes, name: str) -> None:
        """Talk about this picture (a file's bytes) from now on, in a new conversation, as `reset`.
        Only for runners with `set_image` (MoshiVis); a picture it cannot decode fails the engine.
        Until the engine has taken it in, it may be as slow to answer as while loading."""
        if self._start_over(("image", data, name)):
            self._new_picture = True

    def _start_over(self, msg: tuple) -> bool:
        if self.state != "live":
            return False
        try:
            self._conn.send(msg)
        except OSError:
            return False
        self._resets_pending += 1
        self._next_index = 0
        return True

    def poll(self, timeout: float = 0.0) -> list[EngineEvent]:
        """What the engine said since the last poll, waiting up to `timeout` s for the first word.
        A `Failed` event comes once; the process is ended by then."""
        if self.state in ("failed", "closed"):
            return []
        if timeout > 0 and not self._conn.poll():
            wait([self._conn, self.process.sentinel], timeout)
        events: list[EngineEvent] = []
        try:
            while self._conn.poll():
                event = self._take(self._conn.recv())
                if event is not None:
                    events.append(event)
        except (EOFError, OSError):
            pass  # the process is gone: `_health` says why
        failure = self._health()
        if failure is not None:
            events.append(self._fail(failure))
        return events

    def close(self, timeout: float = 2.0) -> None:
        """Ask the child to stop, then make sure it has: nothing is left behind."""
        if self.state == "closed":
            return
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._end_process(timeout)
        self.state = "closed"

    # -- internals --------------------------------------------------------------------------

    def _take(self, msg: tuple) -> EngineEvent | None:
        self._last_heard = time.monotonic()
        kind = msg[0]
        if kind == "out":
            sent = self._in_flight.popleft()
            self._last_answer = self._last_heard
            if self._resets_pending:
                return None  # answers a frame of the conversation that was reset
            _, pcm, text, timings, gate, user_text, late = msg
            timings = dict(timings, roundtrip=(self._last_heard - sent) * 1000)
            index = self._answered
            self._answered += 1
            return Output(index, pcm, text, timings, gate, user_text, late)
        if kind == "alive":
            return None
        if kind == "reset":
            self._resets_pending -= 1
            if not self._resets_pending:
                self._answered = 0
                self._new_picture = False
                self._last_answer = self._last_heard  # frames sent meanwhile waited on the reset
            return None
        if kind == "loading":
            return Loading(msg[1])
        if kind == "warming":
            self.state = "warming up"
            return WarmingUp()
        if kind == "ready":
            self.state, self.info = "live", msg[1]
            # A model slower than real time (7B on a CPU) still answers every frame, only late:
            # what counts as a stall scales with what a warm-up step took.
            self.stall_timeout_s = max(self.stall_timeout_s, STALL_STEPS * msg[2])
            return Ready(msg[1])
        if kind == "error":
            self._error = (msg[1], msg[2])
            return None
        raise EngineProcessError(f"unexpected message from the engine process: {kind!r}")

    def _health(self) -> tuple[str, str] | None:
        if self._error is not None:
            return self._error
        if not self.process.is_alive():
            code = self.process.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return f"the engine process {how}", ""
        now = time.monotonic()
        slow = self.state in ("loading", "warming up") or self._new_picture
        limit = self.load_timeout_s if slow else self.stall_timeout_s
        if now - self._last_heard > limit:
            return f"the engine process stopped responding (silent for {now - self._last_heard:.1f} s)", ""
        if self._in_flight:
            # A slow engine still answers; a stalled one leaves the oldest frame unanswered.
            waiting = now - max(self._in_flight[0], self._last_answer)
            if waiting > limit:
                return f"the engine stalled: no answer to a frame for {waiting:.1f} s", ""
        return None

    def _fail(self, failure: tuple[str, str]) -> Failed:
        # A child that reported its error exits by itself; a stalled or frozen one never will.
        self._end_process(1.0 if failure is self._error else 0.0)
        self.state = "failed"
        return Failed(*failure)

    def _end_process(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive() and timeout > 0:
            self.process.terminate()
            self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()  # also ends a stopped (SIGSTOP) process, which SIGTERM does not
            self.process.join()
        self._conn.close()


# -- child side -----------------------------------------------------------------------------


class _Link:
    """The child's end of the pipe, shared by the main loop and the heartbeat thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self.lock:
            self.conn.send(msg)


def _heartbeat(link: _Link, parent_pid: int) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        if os.getppid() != parent_pid:
            os._exit(0)  # orphaned: the parent was killed and cannot stop us
        try:
            link.send(("alive",))
        except OSError:
            os._exit(0)


def _redirect_output(log_path: str | None) -> None:
    # O_NOFOLLOW: a symlink planted at the log's name fails the open rather than take the writes.
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # a crash in native code leaves a trace in the log


def _load_runner_class(path: str) -> type[Runner]:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise EngineProcessError(f"cannot load the engine runner {path}: {exc}") from exc


def _set_image(runner: Runner, data: bytes, name: str) -> None:
    from .runner import PictureRunner  # the child only: it needs torch

    if not isinstance(runner, PictureRunner):
        raise EngineProcessError(f"{type(runner).__name__} cannot look at pictures")
    from .moshivis.vision import open_image

    runner.set_image(open_image(data), name)  # which also resets the conversation


def _child_main(conn: Connection, runner_path: str, options: Any, parent_pid: int, log_path: str | None) -> None:
    _redirect_output(log_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Daemonic so that the parent's interpreter ends it at exit, but multiprocessing refuses
    # children to a daemonic process: this one may start Mimi's encoder process, which ends by
    # itself when this process does (its pipe closes).
    multiprocessing.current_process().daemon = False
    link = _Link(conn)
    threading.Thread(target=_heartbeat, args=(link, parent_pid), daemon=True).start()
    try:
        runner_class = _load_runner_class(runner_path)
        runner: Runner = runner_class.load(options, progress=lambda text: link.send(("loading", text)))
        link.send(("warming",))
        runner.warmup()
        step_s = 0.0
        for _ in range(TIMED_WARM_STEPS):
            started = time.perf_counter()
            runner.step(np.zeros(runner.frame_size, dtype=np.float32))
            step_s = max(step_s, time.perf_counter() - started)
        runner.reset()
        link.send(("ready", runner.describe(), step_s))
        while True:
            msg = conn.recv()
            if msg[0] == "frame":
                out = runner.step(msg[2])
                link.send(("out", out.pcm, out.text, out.timings_ms, out.gate, out.user_text, out.late))
            elif msg[0] == "reset":
                runner.reset()
                link.send(("reset",))
            elif msg[0] == "image":
                _set_image(runner, msg[1], msg[2])
                link.send(("reset",))
            elif msg[0] == "stop":
                runner.close()  # ends Mimi's encoder process, if it has one, before this one exits
                return
    except EOFError:
        return  # the parent closed the pipe
    except EngineError as exc:
        link.send(("error", str(exc), traceback.format_exc()))
    except BaseException as exc:  # noqa: BLE001 - the parent must hear about every failure
        link.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
