"""Pilot tests: every key binding, engine failure, and the coalesced figures."""

import math
import threading

import pytest

from audio.core import AudioStats
from moshi_tui.app import HelpScreen, MoshiApp
from moshi_tui.messages import Stats
from moshi_tui.widgets import AudioPanel, LatencyPanel, StatusBar, TranscriptView

from .script import MOSHI_WORDS, ScriptedConversation

SIZE = (80, 24)


async def _live(pilot, conv: ScriptedConversation, frames: int = 40) -> None:
    conv.load()
    conv.go_live()
    conv.play(frames)
    await pilot.pause()


@pytest.mark.parametrize("key, status", [("q", 0), ("ctrl+c", 130)])
async def test_quit_keys_stop_the_conversation(key, status):
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        await pilot.press(key)
        await pilot.pause()
    assert conv.calls[-1] == ("stop",)
    assert app.return_code == status
    assert app.state == "ended"


async def test_space_mutes_and_unmutes():
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        await pilot.press("space")
        assert conv.calls[-1] == ("muted", True)
        assert app.query_one(StatusBar).muted and app.query_one(AudioPanel).muted
        assert "muted" in str(app.query_one(AudioPanel).render().renderables[0])
        await pilot.press("space")
        assert conv.calls[-1] == ("muted", False)
        assert not app.query_one(StatusBar).muted


async def test_r_restarts_with_an_empty_transcript_and_fresh_figures():
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv, frames=80)
        transcript = app.query_one(TranscriptView)
        assert transcript.model.paragraphs
        await pilot.press("r")
        assert ("restart",) in conv.calls
        assert transcript.model.paragraphs == []
        assert app.query_one(LatencyPanel).stats is None
        conv.play(8)  # the script starts again at frame 0
        await pilot.pause()
        assert transcript.model.paragraphs[0].t == pytest.approx(0.24)
        assert transcript.model.paragraphs[0].text == " ".join(MOSHI_WORDS[:2])


async def test_s_saves_the_transcript_in_the_conversation_folder(tmp_path):
    conv = ScriptedConversation()
    conv.folder = tmp_path
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv, frames=40)  # 10 words, one every 4 frames from frame 3
        await pilot.press("s")
        await pilot.pause()
        [note] = app._notifications
    [saved] = tmp_path.glob("transcript-saved-*.txt")
    assert saved.read_text() == "[00:00] moshi: " + " ".join(MOSHI_WORDS[:10]) + "\n"
    assert note.message.splitlines() == ["Transcript saved in", f"{tmp_path.resolve()}/", saved.name]


async def test_s_reports_a_folder_it_cannot_write(tmp_path):
    conv = ScriptedConversation()
    conv.folder = tmp_path / "missing"
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        await pilot.press("s")
        await pilot.pause()
        [note] = app._notifications
        assert note.severity == "error" and "Could not save the transcript" in note.message


async def test_question_mark_opens_help_and_q_only_closes_it():
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        assert not isinstance(app.screen, HelpScreen)
        assert ("stop",) not in conv.calls
        await pilot.press("question_mark")
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_engine_failure_is_shown_then_exits_non_zero():
    conv = ScriptedConversation()
    app = MoshiApp(conv, error_linger_s=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        conv.fail("the engine stopped answering")
        await pilot.pause(0.15)
        assert app.state == "error"
        assert app.query_one("#error").display
        await pilot.pause(0.5)
    assert app.return_code == 1
    assert app.failure == "the engine stopped answering"
    assert conv.calls[-1] == ("stop",)


async def test_a_flood_of_frames_is_coalesced_and_drawn_a_few_times(monkeypatch):
    """3000 frames arrive from another thread at once: queued figures are replaced by newer ones
    (their step times kept for the sparkline), and the panels redraw a few times, not 3000."""
    renders, handled = [], []
    original_render, original_handler = LatencyPanel.render, MoshiApp.on_frame_stats
    monkeypatch.setattr(LatencyPanel, "render", lambda self: renders.append(1) or original_render(self))
    monkeypatch.setattr(MoshiApp, "on_frame_stats", lambda self, m: handled.append(1) or original_handler(self, m))
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        conv.load()
        conv.go_live()
        feeder = threading.Thread(target=conv.play, args=(3000,))
        feeder.start()
        feeder.join()
        await pilot.pause(0.5)
        panel = app.query_one(LatencyPanel)
        assert panel.stats.t == pytest.approx(2999 * 0.08)
        assert len(handled) < 3000
        assert panel.steps == pytest.approx([40.0 + 12.0 * math.sin(i / 3) for i in range(2700, 3000)])  # 300 kept
        assert len(app.query_one(TranscriptView).model.paragraphs) == 1
    assert len(renders) < 20


async def test_lagging_comes_and_goes_with_the_figures():
    conv = ScriptedConversation()
    app = MoshiApp(conv)
    async with app.run_test(size=SIZE) as pilot:
        await _live(pilot, conv)
        assert app.state == "live"
        conv.play(10, slow=True)
        await pilot.pause()
        assert app.state == "lagging"
        conv.play(30)  # more than a second without drops, steps under budget
        await pilot.pause()
        assert app.state == "live"
        conv.deliver(Stats(10.0, AudioStats(lag_ms=1500.0), step_ms=30.0))
        await pilot.pause()
        assert app.state == "lagging"
