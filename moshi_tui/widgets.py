"""The panels of the conversation screen. Each panel keeps the latest figures and draws them when
Textual repaints, so feeding it faster than the screen refreshes costs nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.color import Color, blend_rgb
from rich.console import Group
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from engine.wire import COLOURS, gate_colour

from .messages import SessionInfo, Stats
from .transcript import USER, Change, Transcript, clock

OK, WARN, BAD = "green", "yellow", "red"
STATE_STYLES = {
    "loading": "bold cyan",
    "warming up": "bold cyan",
    "live": "bold green",
    "lagging": "bold yellow",
    "ended": "bold",
    "error": "bold red",
}
BARS = " ▁▂▃▄▅▆▇█"
LATENCY_FIGURES = ("lag", "buffer", "skipped", "underruns")  # all but skipped are of the playback


@dataclass(frozen=True)
class Thresholds:
    """Where a figure turns amber and red."""

    budget_ms: float = 80.0  # one frame of audio: a slower step cannot keep up
    step_warn: float = 0.8  # fraction of the budget
    lag_warn_ms: float = 500.0
    lag_bad_ms: float = 1000.0
    buffer_low_ms: float = 80.0  # less than a frame queued: the next late step is an underrun

    def step(self, ms: float) -> str:
        return OK if ms < self.step_warn * self.budget_ms else WARN if ms < self.budget_ms else BAD

    def lag(self, ms: float) -> str:
        return OK if ms < self.lag_warn_ms else WARN if ms < self.lag_bad_ms else BAD


def _figure(label: str, value: str, style: str) -> Text:
    return Text.assemble((f"{label:<10}", "dim"), (value, style))


def spark_rows(values: Sequence[float], width: int, height: int, top: float, th: Thresholds) -> list[Text]:
    """The last `width` step times as bars `height` rows tall, scaled to `top`, coloured by budget."""
    values = list(values)[-width:]
    rows = [Text() for _ in range(height)]
    for v in values:
        eighths = min(height * 8, max(1, round(v / top * height * 8)))
        style = th.step(v)
        for r in range(height):  # rows[0] is the top row
            fill = min(8, max(0, eighths - (height - 1 - r) * 8))
            rows[r].append(BARS[fill], style)
    return rows


class StatusBar(Widget):
    """One line: model, device, dtype, state."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.info: SessionInfo | None = None
        self.state = "loading"
        self.detail = ""
        self.muted = False

    def show(self, *, info: SessionInfo | None = None, state: str | None = None, detail: str | None = None,
             muted: bool | None = None) -> None:
        if info is not None:
            self.info = info
        if state is not None:
            self.state = state
        if detail is not None:
            self.detail = detail
        if muted is not None:
            self.muted = muted
        self.refresh()

    def render(self) -> Table:
        left = Text(" moshi", "bold")
        if self.info and self.info.server:
            left.append(f"  {self.info.model} · {self.info.server}")
        elif self.info:
            left.append(f"  {self.info.model} · {self.info.device} · {self.info.dtype}")
        right = Text()
        if self.muted:
            right.append("mic muted  ", "bold yellow")
        right.append(f"● {self.state}", STATE_STYLES.get(self.state, "bold"))
        if self.detail:
            right.append(f": {self.detail}")
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True, overflow="ellipsis", max_width=max(10, self.size.width - 12))
        grid.add_row(left, right)
        return grid


class LatencyPanel(Widget):
    """Model step time against the frame budget (figure and sparkline; with a server, the round
    trip of each frame), dropped frames and, when Moshi talks, the playback: lag, buffer, underruns."""

    def __init__(self, thresholds: Thresholds, playback: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.th = thresholds
        self.playback = playback
        self.stats: Stats | None = None
        self.steps: list[float] = []

    def show(self, stats: Stats | None, steps: list[float]) -> None:
        self.stats, self.steps = stats, steps
        self.refresh()

    def render(self) -> Group:
        """Always the same lines (dashes until there are figures), so the layout never shifts."""
        s, th = self.stats, self.th
        if s is not None and s.step_ms is not None:
            step = _figure("step", f"{s.step_ms:5.1f} / {th.budget_ms:.0f} ms", th.step(s.step_ms))
        elif s is not None and s.roundtrip_ms is not None:
            # A server does not tell its step time: what it took to answer, the network included, stands for it.
            step = _figure("round trip", f"{s.roundtrip_ms:5.1f} ms", th.lag(s.roundtrip_ms))
        else:
            step = _figure("step", f"   -- / {th.budget_ms:.0f} ms", "dim")
        spark = spark_rows(self.steps, self.content_size.width, 2, 1.5 * th.budget_ms, th)
        if s is None:
            figures = {label: _figure(label, "   --", "dim") for label in LATENCY_FIGURES}
        else:
            a = s.audio
            figures = {
                "lag": _figure("lag", "   --" if a.lag_ms is None else f"{a.lag_ms:5.0f} ms",
                               "dim" if a.lag_ms is None else th.lag(a.lag_ms)),
                "buffer": _figure("buffer", f"{a.buffered_ms:5.0f} ms",
                                  WARN if a.buffered_ms < th.buffer_low_ms else OK),
                "skipped": _figure("skipped", f"{s.skipped:5d}", WARN if s.skipped else OK),
                "underruns": _figure("underruns", f"{a.underruns:5d}", WARN if a.underruns else OK),
            }
        shown = LATENCY_FIGURES if self.playback else ("skipped",)
        return Group(step, *spark, *(figures[label] for label in shown))


def level_bar(label: str, db: float, width: int) -> Text:
    """`mic  -23 dB ██████░░░░`: -60 dB is empty, 0 dB full; amber near full scale, red at clipping."""
    line = Text(f"{label:<4}", "dim")
    line.append("  -∞ dB " if db <= -99 else f"{db:4.0f} dB ")
    cells = max(0, width - len(line))
    full = round(cells * min(1.0, max(0.0, (db + 60) / 60))) if math.isfinite(db) else 0
    style = OK if db < -12 else WARN if db < -3 else BAD
    line.append("█" * full, style)
    line.append("░" * (cells - full), "dim")
    return line


class AudioPanel(Widget):
    """Mic and speaker levels, echo canceller state."""

    def __init__(self, output: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.output = output  # transcription plays nothing
        self.stats: Stats | None = None
        self.muted = False

    def show(self, stats: Stats | None, muted: bool) -> None:
        self.stats, self.muted = stats, muted
        self.refresh()

    def render(self) -> Group:
        a = (self.stats or Stats(t=0.0)).audio
        width = self.content_size.width
        if self.muted:
            mic = Text.assemble(("mic ", "dim"), ("  muted", "bold yellow"))
        else:
            mic = level_bar("mic", a.input_db, width)
        aec = Text("AEC  ", "dim")
        if self.stats is None:
            aec.append("--", "dim")
        elif a.aec:
            aec.append("on")
            if a.erle_db is not None:
                aec.append(" · echo ")
                aec.append(f"-{a.erle_db:.0f} dB", OK if a.erle_db >= 10 else WARN)
        else:
            aec.append("off", WARN)
        if not self.output:
            return Group(mic)
        return Group(mic, level_bar("out", a.output_db, width), aec)


def _gate_style(level: int) -> Style:
    # Dim grey (not looking) to a bright accent (looking hard): brightness rises with the level, so
    # the ramp survives NO_COLOR, where Textual turns colours into greys.
    rgb = blend_rgb(Color.parse("#707070").triplet, Color.parse("#ffd75f").triplet, level / 10)
    return Style(color=Color.from_triplet(rgb), bold=level >= 8)


GATE_STYLES = tuple(_gate_style(level) for level in range(COLOURS + 1))


class ParagraphView(Static):
    def __init__(self, paragraph, gate: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.paragraph = paragraph
        self.text = Text()  # each piece in its gate colour, in `moshi see`
        self.append(paragraph.text, gate)

    def append(self, piece: str, gate: float | None) -> None:
        self.text.append(piece, None if gate is None else GATE_STYLES[gate_colour(gate)])
        self.redraw()

    def redraw(self) -> None:
        p = self.paragraph
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(ratio=1, overflow="fold")
        if p.speaker == USER:
            self.add_class("-user")
            if p.text:  # recognised beside the conversation
                grid.add_row(clock(p.t), Text.assemble(("you ", "bold cyan"), (self.text.plain, "cyan")))
            else:
                grid.add_row(clock(p.t), Text("▸ you spoke", "italic cyan"))
        else:
            grid.add_row(clock(p.t), self.text)
        self.update(grid)


class TranscriptView(VerticalScroll):
    """The words as they are generated, a paragraph per turn, scrolled to the newest."""

    MAX_PARAGRAPHS = 500  # older ones leave the screen (the session files keep everything)

    def __init__(self, speaker: str | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.speaker = speaker
        self.model = Transcript(speaker)
        self.hint = Static("", id="hint")
        self._last: ParagraphView | None = None

    def compose(self):
        yield self.hint

    def set_hint(self, text: str) -> None:
        self.hint.update(text)
        self.hint.display = bool(text) and not self.model.paragraphs

    def add_text(self, t: float, text: str, gate: float | None = None) -> None:
        """`gate` (`moshi see`): colour the piece by how much Moshi looked at the picture."""
        self._draw(self.model.add_text(t, text), gate)

    def add_user_text(self, t: float, text: str) -> None:
        self._draw(self.model.add_user_text(t, text), None)

    def mark_user(self, t: float) -> None:
        self._draw(self.model.mark_user(t), None)

    def clear(self) -> None:
        self.model = Transcript(self.speaker)
        self.query(ParagraphView).remove()
        self._last = None
        self.hint.display = True

    def _draw(self, change: Change | None, gate: float | None) -> None:
        if change is None:
            return
        if not change.new:
            self._last.append(change.text, gate)
            return
        follow = self.scroll_y >= self.max_scroll_y
        self.hint.display = False
        views = self.query(ParagraphView)
        if len(views) >= self.MAX_PARAGRAPHS:
            views.first().remove()
        self._last = ParagraphView(change.paragraph, gate)
        self.mount(self._last)
        if follow:
            self.scroll_end(animate=False)
