"""Sessions through the real engine process with the tiny random checkpoints: a file transcribed
to stdout (compared with the runner in this process), a chat in the TUI, and an engine killed
in the middle of a conversation; a lost sound device ends a session with its own error."""

import json
import os
import signal
import stat
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from audio import FRAME_SIZE
from audio.core import AudioStats
from audio.errors import AudioError, DeviceError
from engine.options import ModelOptions
from engine.interface import Failed, Output, Ready
from moshi_tui.app import MoshiApp
from moshi_tui.session import FileSource, Session, SessionOptions, run
from moshi_tui.widgets import LatencyPanel, TranscriptView

from .processes import engine_children

pytestmark = pytest.mark.timeout(120)
SR = 24000


def _file_pcm(path) -> np.ndarray:
    """Every frame a `FileSource` gives for `path`, end to end: what the model hears."""
    source, frames = FileSource(path, realtime=False), []
    while not source.finished:
        frames.append(source.read(0.0))
    return np.concatenate(frames)


def _speech_file(path, seconds: float, seed: int = 0):
    """A buzz with a syllable rhythm and a little noise: something for the models to hear."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    buzz = np.sign(np.sin(2 * np.pi * 140 * t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    pcm = 0.3 * buzz + 0.02 * rng.standard_normal(len(t))
    sf.write(path, pcm.astype(np.float32), SR)
    return path


def _session(options, record_dir):
    from engine.process import EngineProcess

    source = FileSource(options.input_file, realtime=options.mode == "chat")
    engine = EngineProcess(options.mode, options.model)
    return Session(options, engine, source, record_dir)


def test_transcribe_a_file_to_stdout_as_the_runner_does(tmp_path, tiny, capsys, one_thread_engine):
    from engine.stt.runner import TranscribeRunner

    audio = _speech_file(tmp_path / "talk.wav", 1.5)
    model = ModelOptions(hf_repo=str(tiny["transcribe"]), dtype="float32")
    run(SessionOptions("transcribe", model, input_file=audio, record_dir=tmp_path / "rec", tui=False))
    words = capsys.readouterr().out

    # The oracle: the same runner in this process, fed the same frames.
    runner = TranscribeRunner.load(model)
    try:
        runner.warmup()
        frames = _file_pcm(audio).reshape(-1, FRAME_SIZE)
        pieces = [(i * 0.08, out.text) for i, out in enumerate(map(runner.step, frames)) if out.text]
    finally:
        runner.close()
    expected = "".join(text for _, text in pieces).strip()
    assert expected and words == expected + "\n"

    [folder] = [p for p in (tmp_path / "rec").iterdir() if p.is_dir()]
    doc = json.loads((folder / "transcript.json").read_text())
    assert [(p["t"], p["text"]) for p in doc["pieces"]] == [(round(t, 3), text) for t, text in pieces]
    wav, rate = sf.read(folder / "audio.wav", dtype="float32")
    assert rate == SR and wav.shape == (frames.size,)
    np.testing.assert_allclose(wav, frames.reshape(-1), atol=1 / 32767)
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and "stats" in events
    assert engine_children() == []


async def test_chat_with_a_recording_in_the_tui(tmp_path, tiny, one_thread_engine):
    audio = _speech_file(tmp_path / "me.wav", 1.0)
    options = SessionOptions("chat", ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32"), input_file=audio)
    session = _session(options, tmp_path / "rec")
    app = MoshiApp(session, mode="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        end = time.monotonic() + 60
        while app.state != "ended" and app.failure is None and time.monotonic() < end:
            await pilot.pause(0.1)
        assert app.state == "ended"
        panel = app.query_one(LatencyPanel)
        assert panel.stats.step_ms > 0 and len(panel.steps) > 40
        shown = app.query_one(TranscriptView).model.to_text()
        await pilot.press("q")
    assert app.return_code == 0 and engine_children() == []
    [folder] = session.folders
    assert (folder / "transcript.txt").read_text() == shown and shown
    wav, _ = sf.read(folder / "audio.wav", dtype="float32")
    frames = _file_pcm(audio)
    assert wav.shape == (len(frames), 2)  # every frame, answered or skipped, in time order
    np.testing.assert_allclose(wav[:, 0], frames, atol=1 / 32767)
    assert np.abs(wav[:, 1]).max() > 0.01  # Moshi's side: the tiny model's noise


async def test_killing_the_engine_mid_conversation(tmp_path, tiny, one_thread_engine):
    audio = _speech_file(tmp_path / "me.wav", 20.0)
    options = SessionOptions("chat", ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32"), input_file=audio)
    session = _session(options, tmp_path / "rec")
    app = MoshiApp(session, mode="chat", error_linger_s=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        end = time.monotonic() + 60
        while (app.state != "live" or len(app.query_one(LatencyPanel).steps) < 15) and time.monotonic() < end:
            await pilot.pause(0.1)
        os.kill(session.engine.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while app.failure is None and time.monotonic() < killed_at + 5:
            await pilot.pause(0.05)
        assert time.monotonic() - killed_at < 1.0
        assert app.state == "error"
        await pilot.pause(1.0)
    assert app.return_code == 1
    assert app.failure == "the engine process was killed by SIGKILL"
    assert engine_children() == []
    [folder] = session.folders
    wav, _ = sf.read(folder / "audio.wav", dtype="float32")
    assert wav.shape[1] == 2 and len(wav) >= 15 * FRAME_SIZE and len(wav) % FRAME_SIZE == 0
    json.loads((folder / "transcript.json").read_text())
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events[-2:]] == ["failed", "end"]
    assert events[-2]["reason"] == "the engine process was killed by SIGKILL"


async def test_mute_and_restart_with_the_real_engine(tmp_path, tiny, one_thread_engine):
    audio = _speech_file(tmp_path / "me.wav", 3.0)
    options = SessionOptions("chat", ModelOptions(hf_repo=str(tiny["chat"]), dtype="float32"), input_file=audio)
    session = _session(options, tmp_path / "rec")
    app = MoshiApp(session, mode="chat")

    async def frames_reach(n: int) -> None:
        end = time.monotonic() + 60
        while len(app.query_one(LatencyPanel).steps) < n and time.monotonic() < end:
            await pilot.pause(0.05)

    async with app.run_test(size=(80, 24)) as pilot:
        await frames_reach(10)
        await pilot.press("space")
        await frames_reach(20)
        await pilot.press("space")
        await frames_reach(25)
        await pilot.press("r")
        await frames_reach(10)  # the figures start again with the new conversation
        await pilot.press("q")
    assert app.return_code == 0 and engine_children() == []
    first, second = session.folders
    events = [json.loads(line) for line in (first / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["restart", "end"]
    muted_at, unmuted_at = (next(e["t"] for e in events if e["event"] == kind) for kind in ("mute", "unmute"))
    file_pcm = _file_pcm(audio)
    wav, _ = sf.read(first / "audio.wav", dtype="float32")
    a, b = round(muted_at / 0.08) * FRAME_SIZE, round(unmuted_at / 0.08) * FRAME_SIZE
    assert b - a >= 5 * FRAME_SIZE
    assert not wav[a:b, 0].any()  # the model heard silence while muted
    np.testing.assert_allclose(wav[:a, 0], file_pcm[:a], atol=1 / 32767)
    np.testing.assert_allclose(wav[b:, 0], file_pcm[b:len(wav)], atol=1 / 32767)
    restarted, _ = sf.read(second / "audio.wav", dtype="float32")
    assert len(restarted) >= 10 * FRAME_SIZE
    np.testing.assert_allclose(restarted[:, 0], file_pcm[:len(restarted)], atol=1 / 32767)  # from the start


class _ReadyEngine:
    """Stands for the engine process: ready at once, takes every frame."""

    in_flight, max_in_flight, skipped = 0, 4, 0

    def __init__(self, runner, options, log_path=None):
        self.events = [Ready({"model": "fake", "device": "cpu", "dtype": "float32"})]

    def poll(self, timeout: float = 0.0):
        events, self.events = self.events, []
        return events

    def send_frame(self, pcm) -> bool:
        return True

    def close(self) -> None:
        pass


class _LostMicrophone:
    realtime, finished, captured_at, records = True, False, None, False

    def read(self, timeout: float):
        raise DeviceError("the microphone went away")

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("debug", ["0", "1"])
def test_a_lost_device_ends_the_session_with_an_audio_error(tmp_path, monkeypatch, capsys, debug):
    """Not an engine error: the CLI prints either as one line; MOSHI_DEBUG=1 adds the traceback."""
    import engine.process
    import moshi_tui.session as session

    monkeypatch.setattr("engine.process.EngineProcess", _ReadyEngine)  # run() imports it from there
    monkeypatch.setattr(session, "open_source", lambda options: _LostMicrophone())
    monkeypatch.setenv("MOSHI_DEBUG", debug)
    with pytest.raises(DeviceError, match="^the microphone went away$"):
        run(SessionOptions("chat", record_dir=tmp_path, tui=False))
    assert ("Traceback" in capsys.readouterr().err) == (debug == "1")


def test_a_recorded_session_is_private_and_says_where_it_went(tmp_path, tiny, capsys, one_thread_engine):
    audio = _speech_file(tmp_path / "talk.wav", 1.0)
    model = ModelOptions(hf_repo=str(tiny["transcribe"]), dtype="float32")
    run(SessionOptions("transcribe", model, input_file=audio, record_dir=tmp_path / "rec", tui=False))
    [folder] = (tmp_path / "rec").glob("*-transcribe")
    assert f"moshi: the session is recorded in {folder}\n" in capsys.readouterr().err
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "rec").stat().st_mode) == 0o700
    files = [*folder.iterdir(), tmp_path / "rec" / "engine.log"]
    assert {p.name for p in files} == {"audio.wav", "transcript.txt", "transcript.json", "events.jsonl", "engine.log"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_no_record_keeps_no_files(tmp_path, tiny, capsys, monkeypatch, one_thread_engine):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    audio = _speech_file(tmp_path / "talk.wav", 1.0)
    model = ModelOptions(hf_repo=str(tiny["transcribe"]), dtype="float32")
    run(SessionOptions("transcribe", model, input_file=audio, record=False, tui=False))
    assert not (tmp_path / "data").exists() and "recorded" not in capsys.readouterr().err


class _FailingEngine(_ReadyEngine):
    """Ready, answers its first four frames (the user's speech is told with its frame's answer),
    then fails on the fifth."""

    def __init__(self, runner=None, options=None, log_path=None):
        super().__init__(runner, options)
        self.frames = 0

    def send_frame(self, pcm) -> bool:
        self.frames += 1
        if self.frames < 5:
            self.events.append(Output(self.frames - 1, None, None, {"total": 1.0}))
        elif self.frames == 5:
            self.events.append(Failed("the model ran out of memory"))
        return True


class _Talker:
    """A microphone whose voice detector flips at every frame."""

    realtime, finished, captured_at, records = False, False, None, False

    def __init__(self) -> None:
        self.voice = False

    def read(self, timeout: float):
        self.voice = not self.voice
        return np.zeros(FRAME_SIZE, np.float32)

    def stats(self) -> AudioStats:
        return AudioStats(voice=self.voice)

    def play(self, pcm, captured_at=None) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_nothing_is_recorded_after_the_engine_failed(tmp_path):
    session = Session(SessionOptions("chat"), _FailingEngine(), _Talker(), tmp_path)
    session.start(lambda event: None)
    assert session.done.wait(10)
    [folder] = session.folders
    kinds = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert "speech" in kinds and kinds[-2:] == ["failed", "end"], kinds


def test_a_file_source_reads_its_file_block_by_block(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(120 * 48000, np.int16), 48000, subtype="PCM_16")  # 2 minutes: 46 MB as float32 at 48 kHz
    tracemalloc.start()
    try:
        source = FileSource(path, realtime=False)
        for _ in range(100):
            source.read(0.0)
        source.clear()
        source.read(0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000


def test_a_file_of_an_absurd_sample_rate_is_refused(tmp_path):
    path = tmp_path / "8hz.wav"
    sf.write(path, np.zeros(1000, np.int16), 8, subtype="PCM_16")
    with pytest.raises(AudioError, match="declares a sample rate of 8 Hz: moshi reads 1 kHz to 768 kHz"):
        FileSource(path, realtime=True)
