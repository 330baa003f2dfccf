"""The `moshi see` screen: `o` opens another picture (a new conversation), a bad file is one line
in the app, and the words take the colour of their gate level."""

import struct
import warnings
import zlib

import pytest

from engine.wire import colour_gate, gate_colour
from moshi_tui.app import MoshiApp, OpenImageScreen
from moshi_tui.picture import MAX_PIXELS, PictureError, PictureView, load_picture
from moshi_tui.widgets import GATE_STYLES, ParagraphView, TranscriptView

from .script import SEE_WORDS, ScriptedConversation

SIZE = (80, 24)


async def _live_see(pilot, conv, frames=40):
    conv.load()
    conv.go_live()
    conv.play(frames)
    await pilot.pause()


async def _open(pilot, path) -> None:
    await pilot.press("o")
    assert isinstance(pilot.app.screen, OpenImageScreen)
    pilot.app.screen.query_one("#image-path").value = str(path)
    await pilot.press("enter")
    await pilot.pause()


async def test_o_opens_another_picture_in_a_new_conversation(sun_picture, tmp_path):
    from PIL import Image

    night = tmp_path / "night.png"
    Image.new("RGB", (300, 300), (10, 10, 40)).save(night)
    conv = ScriptedConversation(mode="see")
    app = MoshiApp(conv, mode="see", image=sun_picture)
    async with app.run_test(size=SIZE) as pilot:
        await _live_see(pilot, conv)
        view = app.query_one(PictureView)
        assert view.border_title == "sun.jpg" and view.picture.size == (640, 480)
        assert app.query_one(TranscriptView).model.paragraphs
        await _open(pilot, night)
        assert not isinstance(app.screen, OpenImageScreen)
        assert conv.calls[-1] == ("image", "night.png", night.stat().st_size)
        assert view.border_title == "night.png" and view.picture.size == (300, 300)
        assert view.picture.getpixel((0, 0)) == (10, 10, 40)
        assert app.query_one(TranscriptView).model.paragraphs == []
        conv.play(8)  # the new conversation, from frame 0
        await pilot.pause()
        assert app.query_one(TranscriptView).model.paragraphs[0].text == " ".join(SEE_WORDS[:2])


def huge_png(width: int = 12000, height: int = 12000) -> bytes:
    """A PNG whose header declares `width`×`height` pixels: a decoder would need 432 MB for them, and
    finds no pixel data."""
    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + end


def test_a_huge_picture_is_refused_from_its_header_without_a_warning(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        with pytest.raises(PictureError, match=r"huge.png is too large: 12000×12000, over 100 megapixels"):
            load_picture(path)


def test_the_app_and_the_engine_refuse_the_same_pictures():
    from engine.moshivis.vision import MAX_PIXELS as ENGINE_MAX_PIXELS

    assert MAX_PIXELS == ENGINE_MAX_PIXELS


@pytest.mark.parametrize("name, content, message", [
    ("missing.jpg", None, "picture not found"),
    ("notes.jpg", b"these are words, not pixels", "is not a picture"),
    ("huge.png", huge_png(), "is too large"),
])
async def test_a_bad_file_is_one_line_in_the_app_and_the_conversation_goes_on(sun_picture, tmp_path, name,
                                                                              content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    conv = ScriptedConversation(mode="see")
    app = MoshiApp(conv, mode="see", image=sun_picture)
    async with app.run_test(size=SIZE) as pilot:
        await _live_see(pilot, conv)
        said = app.query_one(TranscriptView).model.to_text()
        await _open(pilot, path)
        [note] = app._notifications
        assert note.severity == "error" and message in note.message and str(path) in note.message
        assert "\n" not in note.message
        assert not any(call[0] == "image" for call in conv.calls)
        assert app.query_one(PictureView).border_title == "sun.jpg"
        assert app.query_one(TranscriptView).model.to_text() == said and app.state == "live"
        await pilot.press("q")
    assert app.return_code == 0


async def test_escape_keeps_the_picture(sun_picture):
    conv = ScriptedConversation(mode="see")
    app = MoshiApp(conv, mode="see", image=sun_picture)
    async with app.run_test(size=SIZE) as pilot:
        await _live_see(pilot, conv)
        await pilot.press("o")
        await pilot.press("escape")
        assert not isinstance(app.screen, OpenImageScreen)
        assert not any(call[0] == "image" for call in conv.calls)


async def test_o_is_only_for_see():
    conv = ScriptedConversation()
    app = MoshiApp(conv, mode="chat")
    async with app.run_test(size=SIZE) as pilot:
        await _live_see(pilot, conv)
        await pilot.press("o")
        assert not isinstance(app.screen, OpenImageScreen)
        assert not app.query(PictureView)


async def test_words_take_the_colour_of_their_gate(sun_picture):
    conv = ScriptedConversation(mode="see")
    app = MoshiApp(conv, mode="see", image=sun_picture)
    async with app.run_test(size=SIZE) as pilot:
        await _live_see(pilot, conv, frames=60)  # 15 words
        [paragraph] = app.query(ParagraphView)
        text = paragraph.text
        assert text.plain == " ".join(SEE_WORDS[:15])
        for i, word in enumerate(SEE_WORDS[:15]):
            start = text.plain.index(word, sum(len(w) + 1 for w in SEE_WORDS[:i]))
            styles = {span.style for span in text.spans if span.start <= start < span.end}
            assert styles == {GATE_STYLES[gate_colour(conv.gate(i))]}, word


def test_gate_levels_follow_the_official_scale():
    assert [gate_colour(0.005 + 0.0016 * k) for k in range(11)] == list(range(11))
    assert gate_colour(-1.0) == 0 and gate_colour(1.0) == 10
    # A remote client gets the colour, not the gate: the gate it shows must colour the same.
    assert [gate_colour(colour_gate(k)) for k in range(11)] == list(range(11))
