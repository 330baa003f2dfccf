"""The user's words beside a chat, through the real engine process with the tiny checkpoints: they
come from the STT model reading the conversation's own Mimi codes, the same words `moshi transcribe`
finds in the same audio (greedy), and they reach the screen events and the session files."""

import json

import pytest

from audio import FRAME_SIZE
from engine.options import ModelOptions
from moshi_tui.messages import UserWords
from moshi_tui.session import FileSource, Session, SessionOptions

from .test_session import _speech_file

pytestmark = pytest.mark.timeout(180)


def test_the_users_words_are_what_transcribe_finds_in_the_same_frames(tmp_path, tiny, one_thread_engine, monkeypatch):
    from engine.process import EngineProcess
    from engine.stt.runner import TranscribeRunner

    # A step answers its own frame in both runners (with Mimi in its own process a live chat's
    # answers, and the words beside them, come two steps later: the same words, later stamps).
    monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")
    audio = _speech_file(tmp_path / "me.wav", 2.0)
    model = ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32", user_stt=str(tiny["transcribe"]))
    source = FileSource(audio, realtime=False)  # every frame reaches the engine, none skipped
    session = Session(SessionOptions("chat", model), EngineProcess("chat", model), source, tmp_path / "rec")
    events = []
    session.start(events.append)
    assert session.done.wait(120) and session.failure is None
    heard = [(round(e.t, 2), e.text) for e in events if isinstance(e, UserWords)]

    # The oracle: `moshi transcribe`'s runner, in this process, on the same frames. A live chat's
    # Mimi starts over after frame 0 (as Kyutai's server.py does), so its words are those of the
    # audio from frame 1 on.
    runner = TranscribeRunner.load(ModelOptions(hf_repo=str(tiny["transcribe"]), dtype="float32"))
    try:
        file = FileSource(audio, realtime=False)  # the frames the session sent, as it read them
        frames = []
        while not file.finished:
            frames.append(file.read(timeout=1.0))
        frames = frames[1:]
        expected = [(round((i + 1) * 0.08, 2), out.text) for i, out in enumerate(map(runner.step, frames))
                    if out.text]
    finally:
        runner.close()
    assert expected and heard == expected

    [folder] = session.folders
    doc = json.loads((folder / "transcript.json").read_text())
    assert [(p["t"], p["text"]) for p in doc["pieces"] if p.get("speaker") == "you"] == expected
    events_logged = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [(e["t"], e["text"]) for e in events_logged if e["event"] == "user words"] == expected
    assert events_logged[0]["user words"] == str(tiny["transcribe"])
    assert "you: " in (folder / "transcript.txt").read_text()


@pytest.mark.parametrize("fast", [True, False])
def test_auto_keeps_the_stt_only_where_the_warm_step_keeps_to_the_budget(tiny, monkeypatch, fast):
    from engine.moshi import runner as chat_runner
    from engine.moshi.runner import ChatRunner
    from engine.stt.user import AUTO

    monkeypatch.setattr(chat_runner, "wanted", lambda choice: str(tiny["transcribe"]))  # as if it were cached
    monkeypatch.setattr(chat_runner, "keeps_to_budget", lambda steps: fast)
    monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")  # Mimi in this process, whose codebooks are read below
    runner = ChatRunner.load(ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32", user_stt=AUTO))
    try:
        runner.warmup()
        info = runner.describe()
        runner.step(_speech_frame())  # frame 0: a live chat's conversation, and its STT, start at frame 1
        out = runner.step(_speech_frame())
    finally:
        runner.close()
    if fast:
        assert info["user words"] == str(tiny["transcribe"]) and "user stt" in out.timings_ms
    else:
        assert info["user words"] == "off" and info["user words dropped"].startswith("the step with")
        assert out.user_text is None and "user stt" not in out.timings_ms
        assert runner.models.mimi.num_codebooks == 8  # Moshi's own again


def _speech_frame():
    import numpy as np

    t = np.arange(FRAME_SIZE) / 24000
    return (0.3 * np.sin(2 * np.pi * 140 * t)).astype(np.float32)
