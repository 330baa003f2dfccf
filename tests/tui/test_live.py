"""End to end: a chat in the TUI with the tiny random checkpoint, through the real engine process
and real audio I/O (PortAudio on a private PulseAudio server whose null sink loops back to the
microphone), for more than 5 s, with speech played into the sink as the user's voice."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.options import ModelOptions
from moshi_tui.app import MoshiApp
from moshi_tui.session import MicSource, Session, SessionOptions
from moshi_tui.widgets import AudioPanel, LatencyPanel, TranscriptView

from .processes import engine_children

pytestmark = pytest.mark.timeout(180)
LIVE_S = 6.0


def _say(server, tmp_path: Path, text: str) -> subprocess.Popen:
    wav = tmp_path / "user.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    return subprocess.Popen(["paplay", "--device=loop", str(wav)], env=server.env)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
async def test_a_live_chat_through_the_engine_process_and_real_audio(pulse, tiny, tmp_path, one_thread_engine):
    from engine.process import EngineProcess

    options = SessionOptions("chat", ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32"),
                             input_device="pulse", output_device="pulse")
    source = MicSource(options)
    session = Session(options, EngineProcess("chat", options.model), source, tmp_path / "rec")
    app = MoshiApp(session, mode="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        end = time.monotonic() + 60
        while app.state not in ("live", "lagging") and app.failure is None and time.monotonic() < end:
            await pilot.pause(0.1)
        assert app.state in ("live", "lagging"), app.failure
        assert engine_children() == [session.engine.process.pid]
        live_at = time.monotonic()
        speaker = _say(pulse, tmp_path, "Hello Moshi, how are you today? Tell me about the weather.")
        while time.monotonic() - live_at < LIVE_S:
            await pilot.pause(0.2)
        speaker.wait(10)
        await pilot.pause()
        latency, audio = app.query_one(LatencyPanel), app.query_one(AudioPanel)
        shown = app.query_one(TranscriptView).model
        answered = len(latency.steps)
        stats = latency.stats
        print(f"\nlive {LIVE_S:.0f} s: {answered} frames answered, step median {np.median(latency.steps):.1f} ms, "
              f"lag {stats.audio.lag_ms} ms, buffer {stats.audio.buffered_ms:.0f} ms, skipped {stats.skipped}, "
              f"underruns {stats.audio.underruns}, ERLE {stats.audio.erle_db} dB")
        await pilot.press("q")
    assert app.return_code == 0 and app.failure is None
    assert engine_children() == []

    # Frames flowed both ways at the pace of audio: ~12.5 answers a second, Moshi audible.
    assert answered >= 0.8 * LIVE_S / 0.08
    assert stats.step_ms > 0 and stats.audio.lag_ms is not None and 0 < stats.audio.lag_ms < 3000
    assert audio.stats.audio.output_db > -60 and audio.stats.audio.input_db > -100
    assert stats.audio.aec and stats.audio.erle_db is not None
    # Moshi's words reached the screen, and the user's voice was noticed.
    assert any(p.speaker == "moshi" and p.text for p in shown.paragraphs)
    assert any(p.speaker == "you" for p in shown.paragraphs)

    # The session files are complete after exit.
    [folder] = session.folders
    assert (folder / "transcript.txt").read_text() == shown.to_text()
    doc = json.loads((folder / "transcript.json").read_text())
    assert "".join(p["text"] for p in doc["pieces"]).strip().startswith(shown.paragraphs[0].text[:10])
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and events.count("stats") >= LIVE_S - 1
    wav, rate = sf.read(folder / "audio.wav", dtype="float32")
    assert rate == 24000 and wav.shape[1] == 2 and len(wav) / rate >= LIVE_S
    assert np.abs(wav[:, 0]).max() > 0.01 and np.abs(wav[:, 1]).max() > 0.01  # the user, Moshi
