"""Snapshots of the main screens, fed by a scripted conversation (deterministic frames).

Update with `pytest tests/tui --snapshot-update` after an intended change, and look at the SVGs.
"""

from moshi_tui.app import MoshiApp

from .script import ScriptedConversation

SIZE = (80, 24)


def _app(conversation: ScriptedConversation) -> MoshiApp:
    return MoshiApp(conversation, mode=conversation.mode, error_linger_s=None)


def _scene(conversation: ScriptedConversation, play):
    async def run_before(pilot) -> None:
        conversation.load()
        play(conversation)
        await pilot.pause()

    return run_before


def test_loading(snap_compare):
    conv = ScriptedConversation()
    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, lambda c: None))


def test_live_chat(snap_compare):
    conv = ScriptedConversation()

    def play(c):
        c.go_live()
        c.play(60)
        c.play(100, user_speaks_at=75)

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, play))


def test_chat_with_both_sides_words(snap_compare):
    conv = ScriptedConversation()

    def play(c):
        c.go_live()
        c.play(60)
        c.play(100, user_says=(75, "Sure, tell me about the weather please."))

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, play))


def test_lagging(snap_compare):
    conv = ScriptedConversation()

    def play(c):
        c.go_live()
        c.play(40)
        c.play(30, slow=True)

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, play))


def test_engine_error(snap_compare):
    conv = ScriptedConversation()

    def play(c):
        c.go_live()
        c.play(50)
        c.fail("the engine process died (exit code -9)")

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, play))


def test_transcribe(snap_compare):
    conv = ScriptedConversation(mode="transcribe")

    def play(c):
        c.go_live()
        c.play(40)
        c.play(50, user_speaks_at=60)

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, play))


def test_help(snap_compare):
    conv = ScriptedConversation()

    async def run_before(pilot) -> None:
        conv.load()
        conv.go_live()
        await pilot.pause()
        await pilot.press("question_mark")

    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=run_before)


def _live_scene(c):
    c.go_live()
    c.play(120, user_speaks_at=75)


def test_live_chat_without_colour(snap_compare, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")  # read when the app is created
    conv = ScriptedConversation()
    assert snap_compare(_app(conv), terminal_size=SIZE, run_before=_scene(conv, _live_scene))


def test_live_chat_in_a_large_terminal(snap_compare):
    conv = ScriptedConversation()
    assert snap_compare(_app(conv), terminal_size=(120, 36), run_before=_scene(conv, _live_scene))


def _see_app(picture) -> tuple[MoshiApp, ScriptedConversation]:
    conv = ScriptedConversation(mode="see")
    return MoshiApp(conv, mode="see", error_linger_s=None, image=picture), conv


def _see_scene(c):
    c.go_live()
    c.play(90, user_speaks_at=50)


def test_see(snap_compare, sun_picture):
    app, conv = _see_app(sun_picture)
    assert snap_compare(app, terminal_size=SIZE, run_before=_scene(conv, _see_scene))


def test_see_without_colour(snap_compare, sun_picture, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app, conv = _see_app(sun_picture)
    assert snap_compare(app, terminal_size=SIZE, run_before=_scene(conv, _see_scene))
