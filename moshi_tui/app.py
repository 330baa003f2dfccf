"""The conversation screen.

The app never waits on the model or the audio: a `Conversation` (the live session, or a scripted
one in tests) hands it events from any thread through `deliver`, which posts each as a Textual
message (post_message is thread-safe). Each kind has its handler, `on_text_piece` and so on. The
figures of frames the app has not caught up with are dropped for the newest (`FrameStats`), and
the panels only mark themselves for a repaint, so a burst of frames costs one repaint and the UI
cannot fall behind the audio.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

from audio.outputs import write_atomically
from engine.options import Mode

from .messages import (Event, SessionFailed, SessionInfo, StateChanged, Stats, TextPiece, UserSpeech, UserWords,
                       dispatch)
from .picture import PictureError, PictureView, load_picture
from .widgets import AudioPanel, LatencyPanel, StatusBar, Thresholds, TranscriptView

HINTS = {
    "loading": "Loading the model…",
    "warming up": "Warming up…",
    "live": "Listening. Say hello.",
    "ended": "The conversation has ended.",
}
SKIP_MEMORY_S = 1.0  # a dropped frame keeps the state "lagging" this long


class Conversation(Protocol):
    """What the app drives. Every method returns quickly; `stop` may take a second to flush."""

    def start(self, deliver: Callable[[Event], None]) -> None: ...
    def set_muted(self, muted: bool) -> None: ...
    def restart(self) -> None: ...
    def set_image(self, data: bytes, name: str) -> None: ...  # `moshi see`: a new picture, a new conversation
    def stop(self) -> None: ...  # idempotent: ends the engine, flushes the session files

    @property
    def folder(self) -> Path | None: ...  # the current conversation's files; None before it starts


class SessionEvent(Message):
    """A `messages` event from the conversation's thread; `on_session_event` hands it on to the
    handler of its kind."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class FrameStats(Message):
    """`Stats` after one or more frames. When two are queued in a row, Textual drops the older (see
    `can_replace`): the panels show only the newest figures, and the newer message takes over the
    older one's step times, since every step is a bar of the sparkline."""

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self.stats = stats
        step = stats.roundtrip_ms if stats.step_ms is None else stats.step_ms  # a server tells no step time
        self.steps = [] if step is None else [step]

    def can_replace(self, message: Message) -> bool:
        if not isinstance(message, FrameStats):
            return False
        message.steps[:0] = self.steps
        return True


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]
    KEYS = (
        ("q, ctrl+c", "end the conversation and quit"),
        ("space", "mute or unmute the microphone"),
        ("r", "restart the conversation (the model stays loaded)"),
        ("s", "save the transcript to a text file"),
        ("?, esc", "close this help"),
    )
    SEE_KEYS = (("o", "talk about another picture (a new conversation)"),)

    def __init__(self, see: bool = False) -> None:
        super().__init__()
        self.keys = self.KEYS[:-1] + self.SEE_KEYS + self.KEYS[-1:] if see else self.KEYS

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"{key:<11} {what}" for key, what in self.keys)
        yield Static(lines, id="help", markup=False)

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "Keys"


class OpenImageScreen(ModalScreen[Path | None]):
    """Asks for the path of the next picture; Enter opens it, Escape keeps the current one."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="open-image"):
            yield Input(placeholder="path/to/picture.jpg", id="image-path")

    def on_mount(self) -> None:
        self.query_one("#open-image").border_title = "Talk about another picture"

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        self.dismiss(Path(path).expanduser() if path else None)


class MoshiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "moshi"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit(130)", "Quit", show=False, priority=True),
        Binding("space", "toggle_mute", "Mute"),
        Binding("r", "restart", "Restart"),
        Binding("s", "save", "Save"),
        Binding("o", "open_image", "Picture"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        conversation: Conversation,
        *,
        mode: Mode | str = Mode.CHAT,
        thresholds: Thresholds = Thresholds(),
        error_linger_s: float | None = 2.0,
        image: Path | None = None,
    ) -> None:
        """`mode`, or its name: in SEE, `image` is the picture shown beside the words."""
        super().__init__()
        self.conversation = conversation
        self.mode = Mode(mode)
        self.thresholds = thresholds
        self.error_linger_s = error_linger_s  # None: stay on the error screen (snapshots)
        self.image = image
        self.state = "loading"
        self.muted = False
        self.failure: str | None = None  # why the session failed; the app then exits with code 1
        self._reset_figures()
        self._stopping: asyncio.Future | None = None

    def _reset_figures(self) -> None:
        self._stats: Stats | None = None
        self._steps: deque[float] = deque(maxlen=300)
        self._skipped = 0
        self._last_skip_t = -math.inf

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        talks = self.mode.talks
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield TranscriptView("moshi" if talks else None, id="transcript")
                yield Static(id="error", markup=False)
            with Vertical(id="side"):
                if self.mode is Mode.SEE:
                    yield PictureView(id="picture")
                yield LatencyPanel(self.thresholds, playback=talks, id="latency")
                yield AudioPanel(output=talks, id="audio")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(TranscriptView).border_title = "Moshi" if self.mode.talks else "Transcript"
        if self.mode is Mode.SEE and self.image is not None:
            self._show_picture(self.image)
        self.query_one(LatencyPanel).border_title = "Latency"
        self.query_one(AudioPanel).border_title = "Audio"
        self._set_state("loading")
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self._end_on_signal, signum)
        self.conversation.start(self.deliver)

    def _end_on_signal(self, signum: int) -> None:
        """SIGINT (`kill -INT`: Ctrl-C itself is a key here), SIGTERM and SIGHUP end the conversation as q
        does; the exit status is 128 + the signal's number."""
        self.run_worker(self.action_quit(128 + signum))

    # -- events ------------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        """Thread-safe: called by the conversation for every event."""
        self.post_message(FrameStats(event) if isinstance(event, Stats) else SessionEvent(event))

    def on_session_event(self, message: SessionEvent) -> None:
        dispatch(self, message.event)

    def on_text_piece(self, event: TextPiece) -> None:
        self.query_one(TranscriptView).add_text(event.t, event.text, event.gate)

    def on_user_words(self, event: UserWords) -> None:
        self.query_one(TranscriptView).add_user_text(event.t, event.text)

    def on_user_speech(self, event: UserSpeech) -> None:
        if event.speaking:
            self.query_one(TranscriptView).mark_user(event.t)

    def on_state_changed(self, event: StateChanged) -> None:
        if self.failure is None:
            self._set_state(event.state, event.detail)

    def on_session_info(self, event: SessionInfo) -> None:
        self.query_one(StatusBar).show(info=event)

    def on_session_failed(self, event: SessionFailed) -> None:
        self._fail(event.reason)

    def on_frame_stats(self, message: FrameStats) -> None:
        stats = message.stats
        self._steps.extend(message.steps)
        if stats.skipped > self._skipped:
            self._last_skip_t = stats.t
        self._skipped = stats.skipped
        self._stats = stats
        self.query_one(LatencyPanel).show(stats, list(self._steps))
        self.query_one(AudioPanel).show(stats, self.muted)
        if self.state in ("live", "lagging"):
            self._set_state("lagging" if self._lagging() else "live")

    def _lagging(self) -> bool:
        s, th = self._stats, self.thresholds
        return (
            (s.step_ms is not None and s.step_ms >= th.budget_ms)
            or (s.audio.lag_ms is not None and s.audio.lag_ms >= th.lag_bad_ms)
            or s.t - self._last_skip_t < SKIP_MEMORY_S
        )

    def _set_state(self, state: str, detail: str = "") -> None:
        if state == self.state and detail == self.query_one(StatusBar).detail:
            return
        self.state = state
        self.query_one(StatusBar).show(state=state, detail=detail)
        if state in HINTS:
            self.query_one(TranscriptView).set_hint(HINTS[state] + (f"\n{detail}" if detail else ""))

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._set_state("error")
        error = self.query_one("#error", Static)
        error.update(f"Error: {reason}")
        error.display = True
        self.run_worker(self._fail_then_exit(), exit_on_error=False)

    # -- keys --------------------------------------------------------------------------------

    async def action_quit(self, return_code: int = 0) -> None:
        """q quits with 0, Ctrl-C with 130, a signal with 128 + its number; a failed session with 1."""
        if self.failure is None:
            self._set_state("ended")
        await self._stop_conversation()
        self.exit(return_code=1 if self.failure else return_code)

    def action_toggle_mute(self) -> None:
        self.muted = not self.muted
        self.conversation.set_muted(self.muted)
        self.query_one(StatusBar).show(muted=self.muted)
        self.query_one(AudioPanel).show(self._stats, self.muted)

    def action_restart(self) -> None:
        if self._start_over(self.conversation.restart):
            self.notify("New conversation.", timeout=2)

    def _start_over(self, start: Callable[[], None]) -> bool:
        """A new conversation (`start` tells the conversation); False when there is none to start."""
        if not self._can_start_over():
            return False
        start()
        self.query_one(TranscriptView).clear()
        self._reset_figures()
        self.query_one(LatencyPanel).show(None, [])
        self.query_one(AudioPanel).show(None, self.muted)
        return True

    def _can_start_over(self) -> bool:
        return self.failure is None and self._stopping is None and self.state != "ended"

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        return action != "open_image" or self.mode is Mode.SEE  # False also hides it from the footer

    def action_open_image(self) -> None:
        self.push_screen(OpenImageScreen(), self._open_image)

    def _open_image(self, path: Path | None) -> None:
        if path is None or not self._can_start_over():
            return
        shown = self._show_picture(path)
        if shown is not None and self._start_over(lambda: self.conversation.set_image(shown, path.name)):
            self.notify(f"New conversation about {path.name}.", timeout=3)

    def _show_picture(self, path: Path) -> bytes | None:
        """Show the picture; its bytes, or None (and a one-line error) when it cannot be read."""
        try:
            data, picture = load_picture(path)
        except PictureError as exc:
            self.notify(str(exc), severity="error", timeout=6)
            return None
        self.image = path
        self.query_one(PictureView).show(picture, path.name)
        return data

    def action_save(self) -> None:
        """The transcript so far, into the conversation's folder beside its recording."""
        folder = self.conversation.folder
        if folder is None:
            self.notify("Nothing to save yet: the conversation has not started")
            return
        path = folder.resolve() / f"transcript-saved-{datetime.now():%H%M%S}.txt"
        try:
            write_atomically(path, self.query_one(TranscriptView).model.to_text())
        except OSError as exc:
            self.notify(f"Could not save the transcript: {exc}", severity="error")
        else:
            # The folder and the name each on a line of their own: a toast wraps long lines anywhere.
            self.notify(f"Transcript saved in\n{path.parent}/\n{path.name}", timeout=6)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(see=self.mode is Mode.SEE))

    # -- ending ------------------------------------------------------------------------------

    async def _stop_conversation(self) -> None:
        """Stop once, off the event loop: stopping joins the engine process and flushes files."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(asyncio.to_thread(self.conversation.stop))
        await self._stopping

    async def _fail_then_exit(self) -> None:
        await self._stop_conversation()
        if self.error_linger_s is not None:
            await asyncio.sleep(self.error_linger_s)  # long enough to read the error panel
            self.exit(return_code=1)
