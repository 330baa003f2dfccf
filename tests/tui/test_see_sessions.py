"""`moshi see` through the real engine process with the tiny MoshiVis checkpoint: the words and
their gates on screen are what the runner says in this process, and `o` gives the engine a new
picture mid-conversation."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from audio import FRAME_SIZE
from engine.moshivis.tiny import write_tiny_moshivis_checkpoint
from engine.options import SeeOptions
from engine.process import TIMED_WARM_STEPS
from engine.wire import gate_colour
from moshi_tui.app import MoshiApp
from moshi_tui.session import FileSource, Session, SessionOptions
from moshi_tui.widgets import GATE_STYLES, LatencyPanel, ParagraphView, TranscriptView

from .processes import engine_children
from .test_chat_command import wait_until_recorded
from .test_session import _file_pcm, _speech_file

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_vis(tmp_path_factory):
    return write_tiny_moshivis_checkpoint(tmp_path_factory.mktemp("tiny") / "vis", seed=0)


def _session(options: SessionOptions, source, record_dir) -> Session:
    from engine.process import EngineProcess

    return Session(options, EngineProcess("see", options.model), source, record_dir)


async def _until(pilot, done, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not done() and pilot.app.failure is None and time.monotonic() < end:
        await pilot.pause(0.05)
    assert done(), pilot.app.failure


async def test_see_a_recording_in_the_app_with_the_runners_words_and_gates(tiny_vis, sun_picture, tmp_path,
                                                                           one_thread_engine):
    from engine.moshivis.runner import SeeRunner

    audio = _speech_file(tmp_path / "me.wav", 1.5)
    model = SeeOptions(hf_repo=str(tiny_vis), dtype="float32", image=str(sun_picture), xa_start=2)
    options = SessionOptions("see", model, input_file=audio)
    source = FileSource(audio, realtime=False)  # as fast as the engine answers: no frame is skipped
    session = _session(options, source, tmp_path / "rec")
    app = MoshiApp(session, mode="see", image=sun_picture)
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.state == "ended")
        views = list(app.query(ParagraphView))
        shown = app.query_one(TranscriptView).model.to_text()
        await pilot.press("q")
    assert app.return_code == 0 and engine_children() == []

    # The oracle: the same runner in this process, started as the engine process starts it.
    runner = SeeRunner.load(model)
    runner.warmup()
    for _ in range(TIMED_WARM_STEPS):
        runner.step(np.zeros(FRAME_SIZE, np.float32))
    runner.reset()
    pieces = []
    for i, out in enumerate(map(runner.step, _file_pcm(audio).reshape(-1, FRAME_SIZE))):
        if out.text:
            pieces.append((round(i * 0.08, 3), out.text, out.gate))
    assert len(pieces) > 3 and len({gate_colour(g) for _, _, g in pieces}) > 1
    [folder] = session.folders
    doc = json.loads((folder / "transcript.json").read_text())
    assert [(p["t"], p["text"]) for p in doc["pieces"]] == [(t, text) for t, text, _ in pieces]
    assert doc["image"] == "sun.jpg" and (folder / "transcript.txt").read_text() == shown
    # Each piece on screen in the colour of its gate.
    # Each piece on screen in the colour of its gate (a paragraph's first piece loses its spaces).
    on_screen = [(view.text.plain[span.start:span.end].strip(), span.style) for view in views
                 for span in view.text.spans]
    expected = [(text.strip(), GATE_STYLES[gate_colour(gate)]) for _, text, gate in pieces]
    assert [p for p in on_screen if p[0]] == [p for p in expected if p[0]]


async def test_o_gives_the_engine_a_new_picture(tiny_vis, sun_picture, tmp_path, one_thread_engine):
    from PIL import Image

    night = tmp_path / "night.png"
    Image.new("RGB", (200, 150), (5, 5, 30)).save(night)
    audio = _speech_file(tmp_path / "me.wav", 6.0)
    model = SeeOptions(hf_repo=str(tiny_vis), dtype="float32", image=str(sun_picture), xa_start=0)
    options = SessionOptions("see", model, input_file=audio)
    session = _session(options, FileSource(audio, realtime=True), tmp_path / "rec")
    app = MoshiApp(session, mode="see", image=sun_picture)
    steps = lambda: len(app.query_one(LatencyPanel).steps)  # noqa: E731 - frames answered in this conversation
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: steps() >= 10)
        await pilot.press("o")
        app.screen.query_one("#image-path").value = str(night)
        await pilot.press("enter")
        assert steps() < 10
        await _until(pilot, lambda: steps() >= 10)  # the engine took the picture and answers again
        assert app.state in ("live", "lagging")
        await pilot.press("q")
    assert app.return_code == 0 and app.failure is None and engine_children() == []
    first, second = session.folders
    events = [json.loads(line) for line in (first / "events.jsonl").read_text().splitlines()]
    assert events[0]["image"] == "sun.jpg" and [e["event"] for e in events[-2:]] == ["new image", "end"]
    assert events[-2]["image"] == "night.png"
    start = json.loads((second / "events.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["image"] == "night.png"


def _moshi(*args, env=None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "moshi_tui", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_moshi_see_live_without_the_tui(pulse, tiny_vis, sun_picture, tmp_path):
    """The real command on the microphone and speakers (the private PulseAudio server), until Ctrl-C."""
    moshi = _moshi("see", sun_picture, "--no-tui", "--hf-repo", tiny_vis, "--dtype", "float32", "--record",
                   tmp_path / "rec", "--input-device", "pulse", "--output-device", "pulse", env=pulse.env)
    try:
        seen = []
        for line in moshi.stderr:  # the states, one a line, until the conversation is live
            seen.append(line)
            if line.startswith("moshi: live"):
                break
        assert seen and seen[-1].startswith("moshi: live"), "".join(seen)
        wait_until_recorded(tmp_path / "rec", 2.0)
        moshi.send_signal(signal.SIGINT)
        out, err = moshi.communicate(timeout=30)
    finally:
        moshi.kill()  # whatever happened, nothing is left running
    assert moshi.returncode == 130, err  # ended by Ctrl-C
    [folder] = (tmp_path / "rec").glob("*-see")
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["image"] == "sun.jpg" and events[-1]["event"] == "end"
    said = (folder / "transcript.txt").read_text().splitlines()
    assert any(" moshi: " in line for line in said)
    assert out.splitlines() == said  # stdout has the conversation's lines, each with its time


def test_a_bad_picture_fails_before_anything_starts(tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    moshi = _moshi("see", notes, "--no-tui", "--record", tmp_path / "rec")
    _, err = moshi.communicate(timeout=60)
    assert moshi.returncode == 2 and f"{notes} is not a picture" in " ".join(err.split())
    assert not (tmp_path / "rec").exists()
