"""The transcript model says what each piece changed, and the `--no-tui` printer draws just that."""

import io

from engine.options import Mode
from moshi_tui.messages import StateChanged, Stats, TextPiece, UserSpeech, UserWords
from moshi_tui.session import PlainPrinter
from moshi_tui.transcript import USER, Change, Transcript


def test_add_text_names_the_new_paragraph_or_the_appended_piece():
    transcript = Transcript("moshi")
    first = transcript.add_text(0.24, " Hello")
    assert first == Change(transcript.paragraphs[0], "Hello", new=True, index=0)
    assert transcript.add_text(0.40, " there") == Change(transcript.paragraphs[0], " there", new=False, index=0)
    assert transcript.add_text(0.48, "") is None  # nothing to draw
    assert transcript.add_text(5.0, "  ") is None  # a pause, then only spaces: no paragraph yet
    later = transcript.add_text(5.1, " Fine.")
    assert later.new and later.index == 1 and later.text == "Fine." and later.paragraph.t == 5.1
    assert transcript.paragraphs[0].text == "Hello there"


def test_mark_user_is_a_change_in_a_chat_and_a_break_in_a_transcription():
    chat = Transcript("moshi")
    chat.add_text(0.0, " Hi")
    marker = chat.mark_user(1.0)
    assert marker.new and marker.index == 1 and marker.paragraph.speaker == USER
    assert chat.mark_user(1.5) is None  # already the last paragraph
    assert chat.add_text(1.6, " Yes").new

    transcription = Transcript(None)
    transcription.add_text(0.0, " so this")
    assert transcription.mark_user(1.0) is None
    assert transcription.add_text(1.1, " works") == Change(transcription.paragraphs[1], "works", new=True, index=1)


def test_the_plain_printer_writes_a_timed_line_per_paragraph_and_states_on_stderr():
    out, err = io.StringIO(), io.StringIO()
    printer = PlainPrinter(Mode.CHAT, out, err)
    for event in (StateChanged("live"), TextPiece(0.24, " Hello"), TextPiece(0.4, " there"), Stats(0.4),
                  UserSpeech(3.0, True), UserSpeech(3.5, False), TextPiece(5.0, " Fine.")):
        printer(event)
    printer.close()
    assert out.getvalue() == "[00:00] moshi: Hello there\n[00:03] (you spoke)\n[00:05] moshi: Fine.\n"
    assert err.getvalue() == "moshi: live (Ctrl-C ends it)\n"


def test_both_sides_words_make_their_paragraphs():
    out = io.StringIO()
    printer = PlainPrinter(Mode.CHAT, out, io.StringIO())
    for event in (TextPiece(0.24, " Hello,"), TextPiece(0.4, " what's up?"), UserWords(1.2, " Not"),
                  UserWords(1.36, " much."), TextPiece(1.6, " Good."), UserWords(1.7, " And"), UserWords(1.8, " you?")):
        printer(event)
    printer.close()
    assert out.getvalue() == ("[00:00] moshi: Hello, what's up?\n[00:01] you: Not much.\n[00:01] moshi: Good.\n"
                              "[00:01] you: And you?\n")
    assert printer.transcript.to_text() == out.getvalue()
