"""One session: an audio source, the engine process, the session files, and the TUI or stdout.

A pump thread in the TUI process moves frames: source → engine (never blocking: a frame the
engine has no room for is skipped), engine → speaker, recorder and screen. The app (or the plain
printer) only receives `messages` events; it never waits on the model.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from audio import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from audio.core import AudioStats
from audio.errors import AudioError
from audio.meters import SILENCE_DB, level_db
from engine.env import env_flag
from engine.errors import EngineError
from engine.options import Mode, ModelOptions
from engine.interface import Described, Engine, Failed, Loading, Output, Ready, WarmingUp

from . import signals
from .errors import ArgumentError
from .messages import (Event, SessionFailed, SessionInfo, StateChanged, Stats, TextPiece, UserSpeech, UserWords,
                       dispatch)
from .recording import NoRecorder, Recorder, SessionRecorder, new_session_folder, recognises_user_words
from .settings import data_dir
from .terminal import native_noise_into
from .transcript import Change, Transcript

# Silence after the end of a file so the words still in flight come out (the STT text lags its
# audio by up to 2.5 s for stt-2.6b-en; Moshi needs a moment to finish its sentence).
FILE_TAIL_S = 3.0


@dataclass
class SessionOptions:
    """What `moshi chat` / `moshi see` / `moshi transcribe` pass to `run`."""

    mode: Mode  # SEE is a chat about a picture: `model` is a SeeOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    runner: str | None = None  # engine runner, "module:Class"; default: the mode's
    input_file: Path | None = None  # instead of the microphone
    input_device: str | None = None  # index or name substring
    output_device: str | None = None
    aec: bool = True
    record_dir: Path | None = None  # parent of the session folders; default <XDG data>/moshi/sessions
    record: bool = True  # False: no session files, no engine.log
    tui: bool = True  # False: words to stdout, states to stderr
    server: object | None = None  # --url: an engine.remote.connect.Server, which runs the model instead

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)  # the commands may give its name, "chat"


@dataclass
class Pending:
    """A frame taken from the source and not answered yet."""

    n: int  # its index in the conversation: its time is n × 80 ms
    pcm: np.ndarray
    sent: bool  # False: the engine refused it (it was behind)
    captured_at: float | None
    speaking: bool | None  # the user started (True) or stopped (False) speaking at this frame


class Source(Protocol):
    realtime: bool  # frames come at the pace of audio (else: as fast as the engine takes them)
    finished: bool  # a file that has been read to its end
    captured_at: float | None  # when the frame `read` returned last was captured (None: a file)
    records: bool  # it writes the conversation's WAV itself (`start_recording`)

    def read(self, timeout: float) -> np.ndarray | None: ...
    def play(self, pcm: np.ndarray, captured_at: float | None) -> None: ...
    def clear(self) -> None: ...  # a new conversation: drop what is queued for playback
    def stats(self) -> AudioStats: ...
    def start_recording(self, path: Path) -> None: ...
    def close(self) -> None: ...


class MicSource:
    """The microphone and speaker, through the audio layer (echo cancellation, jitter buffer)."""

    realtime = True
    finished = False
    records = True  # the audio layer records what was heard and played, in real time

    def __init__(self, options: SessionOptions) -> None:
        from audio.core import DuplexConfig
        from audio.duplex import DuplexAudio

        # Echo cancellation only matters when something plays: when Moshi talks.
        config = DuplexConfig(aec=options.aec and options.mode.talks)
        self.audio = DuplexAudio(_device(options.input_device), _device(options.output_device), config)
        self.audio.start()  # warm while the model loads; `clear` drops what was heard meanwhile
        self.captured_at: float | None = None

    def read(self, timeout: float) -> np.ndarray | None:
        frame = self.audio.read(timeout=timeout)
        if frame is None:
            return None
        self.captured_at = frame.captured_at
        return frame.pcm

    def play(self, pcm: np.ndarray, captured_at: float | None = None) -> None:
        self.audio.play(pcm, captured_at)

    def clear(self) -> None:
        self.audio.clear()

    def stats(self) -> AudioStats:
        return self.audio.stats()

    def start_recording(self, path: Path) -> None:
        self.audio.start_recording(path)

    def close(self) -> None:
        self.audio.close()


def _device(spec: str | None) -> str | int | None:
    """A device given as a number is an index; anything else, part of its name."""
    return int(spec) if spec is not None and spec.isdigit() else spec


class FileSource:
    """The user's side read from a file, then `FILE_TAIL_S` of silence (the last frame completed
    with it). The file is read and resampled block by block as the frames are taken, so memory
    stays flat however long the file."""

    captured_at = None
    records = False

    def __init__(self, path: Path, realtime: bool) -> None:
        from audio.inputs import file_input

        self._input = file_input(path)  # checked now: a bad file fails before the model loads
        self.realtime = realtime
        self._in_db = self._out_db = SILENCE_DB
        self.clear()

    def _frames(self) -> Iterator[np.ndarray]:
        from engine.stt.transcription import padded_frames

        # Whole frames only: FRAME_SIZE - 1 more zeros complete the last frame of the file.
        return padded_frames(self._input.open(), 0, round(FILE_TAIL_S * SAMPLE_RATE) + FRAME_SIZE - 1)

    @property
    def finished(self) -> bool:
        return self._next is None

    def read(self, timeout: float) -> np.ndarray | None:
        if self.finished:
            return None
        if self.realtime:
            wait = self._next_at - time.monotonic()
            if wait > timeout:
                time.sleep(timeout)
                return None
            time.sleep(max(0.0, wait))
            self._next_at = max(self._next_at + FRAME_S, time.monotonic() - FRAME_S)
        frame, self._next = self._next, next(self._frames_left, None)
        self._in_db = level_db(frame)
        return frame

    def play(self, pcm: np.ndarray, captured_at: float | None = None) -> None:
        self._out_db = level_db(pcm)  # nothing is played; the meter still shows Moshi's voice

    def clear(self) -> None:
        """From the start of the file: a restarted conversation hears it again."""
        self._frames_left = self._frames()
        self._next = next(self._frames_left, None)
        self._next_at = time.monotonic()

    def stats(self) -> AudioStats:
        return AudioStats(input_db=self._in_db, output_db=self._out_db)

    def start_recording(self, path: Path) -> None:
        raise NotImplementedError("the session recorder writes a file source's audio")

    def close(self) -> None:
        pass


class Session:
    """The app's `Conversation`: runs the pump thread, and everything it owns dies with it."""

    def __init__(self, options: SessionOptions, engine: Engine, source: Source, record_base: Path | None) -> None:
        """`record_base`: where the session folders go; None: nothing is recorded."""
        self.options = options
        self.mode = options.mode
        self.engine = engine
        self.source = source
        self.record_base = record_base
        # Why the session failed, a one-line EngineError or AudioError, and the traceback behind it
        self.failure: tuple[EngineError | AudioError, str] | None = None
        self.done = threading.Event()  # the pump has ended and closed everything
        self.folders: list[Path] = []  # one per conversation (restarts make more)
        self._deliver: Callable[[Event], None] = lambda event: None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._image: tuple[bytes, str] | None = None  # a new picture for the next conversation
        self._muted = False
        self._live = False
        self._recorder: Recorder | None = None
        self._info: dict[str, str] = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._frame = 0  # frames of this conversation taken from the source
        self._pending: deque[Pending] = deque()  # frames awaiting an answer, oldest first
        self._speaking = False
        self._logged_muted = False
        self._steps: list[float] = []
        self._stats_at = 0.0

    # -- the app's side -------------------------------------------------------------------

    def start(self, deliver: Callable[[Event], None]) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="moshi-session", daemon=True)
        self._thread.start()

    def set_muted(self, muted: bool) -> None:
        self._muted = muted

    @property
    def folder(self) -> Path | None:
        return self.folders[-1] if self.folders else None

    def restart(self) -> None:
        self._restart.set()

    def set_image(self, data: bytes, name: str) -> None:
        """`moshi see`: a new picture, and with it a new conversation."""
        self._image = (data, name)
        self._restart.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        else:
            self._close()

    # -- the pump -------------------------------------------------------------------------

    def _run(self) -> None:
        model = self.options.model
        if self.options.server is None:
            self._deliver(SessionInfo(self.mode, model.hf_repo or self.mode.default_model, model.device, model.dtype))
        else:
            self._deliver(SessionInfo(self.mode, "?", "?", "?", server=self.options.server.shown))
        self._deliver(StateChanged("loading"))
        try:
            while not self._stop.is_set() and self.failure is None:
                self._step()
        except Exception as exc:  # a lost device or a bug: the screen must say so, not freeze
            import traceback

            known = isinstance(exc, (EngineError, AudioError))
            self._fail(exc if known else EngineError(f"{type(exc).__name__}: {exc}"), traceback.format_exc())
        finally:
            self._close()

    def _fail(self, error: EngineError | AudioError, detail: str) -> None:
        self.failure = (error, detail)
        self._deliver(SessionFailed(str(error)))

    def _step(self) -> None:
        if not self._live:
            self._take_engine_events(self.engine.poll(timeout=0.05))
            return
        self._take_engine_events(self.engine.poll())
        if self.failure is not None:
            return  # the session ends: no frame after the engine's failure is taken or recorded
        if self._restart.is_set():
            self._restart.clear()
            self._new_conversation()
        if self.source.finished:
            if not self._pending and self._recorder is not None:
                self._end_conversation()
            else:
                self._take_engine_events(self.engine.poll(timeout=0.01))
            return
        if self.source.realtime or self.engine.in_flight < self.engine.max_in_flight:
            frame = self.source.read(timeout=0.01)
            if frame is not None:
                self._take_frame(frame)
        else:
            self._take_engine_events(self.engine.poll(timeout=0.01))

    def _take_engine_events(self, events: list) -> None:
        for event in events:
            dispatch(self, event)

    # -- the engine's events, each to its handler (`dispatch`) ------------------------------

    def on_loading(self, event: Loading) -> None:
        self._deliver(StateChanged("loading", event.detail))

    def on_warming_up(self, event: WarmingUp) -> None:
        self._deliver(StateChanged("warming up"))

    def on_ready(self, event: Ready) -> None:
        self._show_info(event.info)
        self._start_conversation()

    def on_described(self, event: Described) -> None:
        self._show_info(event.info)

    def _show_info(self, info: dict[str, str]) -> None:
        self._info = dict(info)
        self._deliver(SessionInfo(self.mode, info.get("model", "?"), info.get("device", "?"), info.get("dtype", "?"),
                                  server=info.get("server", "")))

    def on_failed(self, event: Failed) -> None:
        if self._recorder is not None:
            self._recorder.event("failed", reason=event.reason)
        self._fail(EngineError(event.reason), event.detail)

    def on_output(self, out: Output) -> None:
        """The answer to the oldest frame still waiting for one."""
        while self._pending and not self._pending[0].sent:
            skipped = self._pending.popleft()  # the model never heard it
            self._user_speech(skipped)
            self._recorder.frame(skipped.pcm, None)
        if not self._pending:
            return  # answers a frame of a conversation since restarted
        frame = self._pending.popleft()
        t = frame.n * FRAME_S
        self._user_speech(frame)
        if out.pcm is not None and self.mode.talks:
            self.source.play(out.pcm, frame.captured_at)
        self._recorder.frame(frame.pcm, out.pcm)
        said = (frame.n - out.late) * FRAME_S  # the frame the words are of: a pipelined engine answers later
        if out.user_text:
            self._deliver(UserWords(said, out.user_text))
            self._recorder.user_text(said, out.user_text)
        if out.text:
            self._deliver(TextPiece(said, out.text, out.gate))
            self._recorder.text(said, out.text)
        audio = self.source.stats()
        stats = Stats(t, audio, step_ms=out.timings_ms.get("total"),
                      skipped=self.engine.skipped + audio.skipped_input_frames,
                      roundtrip_ms=out.timings_ms.get("roundtrip"))
        self._deliver(stats)
        self._log_stats(stats)

    # -- conversations ---------------------------------------------------------------------

    def _start_conversation(self) -> None:
        self.source.clear()
        if self.record_base is None:
            self._recorder = NoRecorder()
        else:
            folder = new_session_folder(self.record_base, self.mode)
            self.folders.append(folder)
            self._recorder = SessionRecorder(folder, self.mode, self._info, wav=not self.source.records)
            if self.source.records:
                self.source.start_recording(folder / "audio.wav")
        self._reset_counters()
        self._live = True
        self._deliver(StateChanged("live"))

    def _new_conversation(self) -> None:
        image, self._image = self._image, None
        if image is None:
            self.engine.reset()
        else:
            self.engine.set_image(*image)
            self._info["image"] = image[1]
        self._flush_pending()
        if self._recorder is not None:
            if image is None:
                self._recorder.event("restart")
            else:
                self._recorder.event("new image", image=image[1])
            self._recorder.close()
        self._start_conversation()

    def _end_conversation(self) -> None:
        self._recorder.close()
        self._recorder = None
        self._deliver(StateChanged("ended"))
        self._stop.set()

    def _take_frame(self, pcm: np.ndarray) -> None:
        muted = self._muted  # set by the app's thread; read once per frame
        if muted != self._logged_muted:
            self._logged_muted = muted
            self._recorder.event("mute" if muted else "unmute", t=round(self._frame * FRAME_S, 3))
        if muted:
            pcm = np.zeros_like(pcm)  # the model hears silence (so does the recording of a file session)
        n = self._frame
        self._frame += 1
        sent = self.engine.send_frame(pcm)
        speaking = self.source.stats().voice
        change = None
        if speaking is not None and speaking != self._speaking and not muted:
            self._speaking = change = speaking
        self._pending.append(Pending(n, pcm, sent, self.source.captured_at, change))

    def _user_speech(self, frame: Pending) -> None:
        """Told with the answer to its frame, so that every line of the conversation comes in the
        order of one clock: the frames'."""
        if frame.speaking is not None:
            if not recognises_user_words(self._info):  # else the user's words make their paragraphs
                self._deliver(UserSpeech(frame.n * FRAME_S, frame.speaking))
            self._recorder.user_speech(frame.n * FRAME_S, frame.speaking)

    def _log_stats(self, stats: Stats) -> None:
        if stats.step_ms is not None:
            self._steps.append(stats.step_ms)
        if stats.t - self._stats_at < 1.0:
            return
        self._stats_at = stats.t
        steps, self._steps = self._steps, []
        self._recorder.event(
            "stats", t=round(stats.t, 3), step_ms_median=round(float(np.median(steps)), 2) if steps else None,
            step_ms_max=round(max(steps), 2) if steps else None, lag_ms=stats.audio.lag_ms,
            buffered_ms=stats.audio.buffered_ms, skipped=stats.skipped, underruns=stats.audio.underruns,
            muted=self._muted,
        )

    def _flush_pending(self) -> None:
        """Frames sent but never answered still go into the recording (the user's side)."""
        if self._recorder is not None:
            for frame in self._pending:
                self._recorder.frame(frame.pcm, None)
        self._pending.clear()

    def _close(self) -> None:
        if self.done.is_set():
            return
        try:
            self.engine.close()
            self._flush_pending()
            if self._recorder is not None:
                self._recorder.close()
        finally:
            self.source.close()
            self.done.set()


class PlainPrinter:
    """`--no-tui`: the words on stdout, the rest on stderr. A conversation's lines are those of
    transcript.txt, each with its time and speaker (`[00:03] you: hello`); a transcription's are
    the words alone, a line per paragraph."""

    def __init__(self, mode: Mode, out=None, err=None) -> None:
        self.transcript = Transcript("moshi" if mode.talks else None)
        self.labels = mode.talks
        self.out, self.err = out or sys.stdout, err or sys.stderr

    def __call__(self, event: Event) -> None:
        dispatch(self, event)

    def on_text_piece(self, event: TextPiece) -> None:
        self._write(self.transcript.add_text(event.t, event.text))

    def on_user_words(self, event: UserWords) -> None:
        self._write(self.transcript.add_user_text(event.t, event.text))

    def on_user_speech(self, event: UserSpeech) -> None:
        if event.speaking:
            change = self.transcript.mark_user(event.t)  # a transcription: the next words begin a line
            if self.labels:
                self._write(change)

    def _write(self, change: Change | None) -> None:
        if change is None:
            return
        text = change.paragraph.line() if change.new and self.labels else change.text
        self.out.write(("\n" if change.new and change.index else "") + text)
        self.out.flush()

    def on_state_changed(self, event: StateChanged) -> None:
        detail = f": {event.detail}" if event.detail else ""
        hint = " (Ctrl-C ends it)" if event.state == "live" else ""
        print(f"moshi: {event.state}{detail}{hint}", file=self.err, flush=True)

    def close(self) -> None:
        if self.transcript.paragraphs:
            self.out.write("\n")
            self.out.flush()


def open_source(options: SessionOptions) -> Source:
    """The microphone (and speaker), or a file. A bad device or file raises a one-line error."""
    if options.input_file is not None:
        # A conversation with a recording plays out in real time; a transcription goes at full speed.
        return FileSource(options.input_file, realtime=options.mode.talks)
    return MicSource(options)


def _record_base(path: Path) -> Path:
    """The folder of the session folders and of engine.log, checked before anything starts."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # As the engine process opens its log: a symlink at its name fails here, not in that process.
        os.close(os.open(path / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        raise ArgumentError(f"cannot record sessions in {path}: {exc.strerror or exc}") from None
    return path


def _say_where_it_went(folders: list[Path]) -> None:
    if len(folders) == 1:
        print(f"moshi: the session is recorded in {folders[0]}", file=sys.stderr)
    elif folders:
        print(f"moshi: the {len(folders)} conversations are recorded in {folders[0].parent} "
              f"({folders[0].name} to {folders[-1].name})", file=sys.stderr)


def run(options: SessionOptions) -> None:
    """Run one session to its end. A failed engine raises EngineError, a failed device AudioError
    (both one line; MOSHI_DEBUG=1 prints the traceback behind it first)."""
    record_base = _record_base(options.record_dir or data_dir() / "sessions") if options.record else None
    source = open_source(options)  # a bad device or file fails here, before anything starts
    if options.server is not None:
        from engine.remote.chat import RemoteEngine, chat_query

        image = getattr(options.model, "image", None)
        engine = RemoteEngine(options.server, chat_query(options.model),
                              None if image is None else Path(image).read_bytes())
    else:
        from engine.process import EngineProcess

        engine = EngineProcess(options.runner or options.mode.runner, options.model,
                               log_path=None if record_base is None else str(record_base / "engine.log"))
    session = Session(options, engine, source, record_base)
    signalled = 0  # the exit status of a run ended by Ctrl-C or a signal (`signals`)
    try:
        with native_noise_into(None if record_base is None else record_base / "engine.log"):
            try:
                if options.tui:
                    from .app import MoshiApp

                    image = getattr(options.model, "image", None)  # `moshi see`: the picture beside the words
                    app = MoshiApp(session, mode=options.mode, image=None if image is None else Path(image))
                    app.run()
                    if app.return_code and app.return_code > 128:
                        signalled = app.return_code
                else:
                    printer = PlainPrinter(options.mode)
                    with signals.raising():
                        try:
                            session.start(printer)
                            while not session.done.wait(0.1):
                                pass
                        except KeyboardInterrupt as exc:
                            signalled = signals.exit_status(exc)
                    printer.close()
            finally:
                session.stop()
    finally:
        _say_where_it_went(session.folders)
    if session.failure is not None:
        error, detail = session.failure
        if detail and env_flag("MOSHI_DEBUG"):
            print(detail, file=sys.stderr)
        raise error
    if signalled:
        sys.exit(signalled)
