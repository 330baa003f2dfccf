"""The real `moshi chat` command, live: on the sound server, with the tiny checkpoint, in a real
terminal (tmux, 80x24) and with --no-tui. Frames flow both ways, Moshi's words come out, the
conversation is recorded, and it ends cleanly."""

import json
import os
import signal
import subprocess
import time
import wave

import pytest

from .test_terminal import MOSHI, Terminal, _engine_pid
from .processes import gone

pytestmark = pytest.mark.timeout(180)


def _env(tmp_path, pulse):
    env = {**os.environ, **pulse.env, "XDG_DATA_HOME": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "MOSHI_CONFIG": str(tmp_path / "none.toml")}
    env.pop("NO_COLOR", None)
    return env


def _recorded_seconds(record_dir) -> float:
    """How much of the conversation its WAV holds so far (the header is rewritten after each block)."""
    try:
        [wav_path] = record_dir.glob("*/audio.wav")
        with wave.open(str(wav_path)) as wav:
            return wav.getnframes() / wav.getframerate()
    except (ValueError, EOFError, wave.Error):  # no folder yet, or no header yet
        return 0.0


def wait_until_recorded(record_dir, seconds: float, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while _recorded_seconds(record_dir) < seconds:
        assert time.monotonic() < end, f"under {seconds} s of conversation recorded after {timeout} s"
        time.sleep(0.1)


def _check_recording(record_dir):
    [folder] = sorted(record_dir.glob("*-chat"))
    with wave.open(str(folder / "audio.wav")) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == 24000
        assert wav.getnframes() > 24000  # more than a second of conversation
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end"
    transcript = json.loads((folder / "transcript.json").read_text())
    return folder, transcript


def test_live_chat_in_a_terminal(tmp_path, tiny, pulse):
    record = tmp_path / "rec"
    term = Terminal(tmp_path, [*MOSHI, "chat", "--hf-repo", str(tiny["chat"]), "--record", str(record)],
                    _env(tmp_path, pulse))
    try:
        screen = term.wait_for("● live")
        lines = screen.rstrip("\n").split("\n")
        assert len(lines) == 24 and max(len(line) for line in lines) <= 80
        engine = _engine_pid(term.app_pid())
        term.wait_for(r"step +\d+\.\d / 80 ms")
        wait_until_recorded(record, 1.5)
        term.press("q")
        assert term.exit_status() == 0
        assert gone(engine)
    finally:
        term.close()
    _check_recording(record)


def test_live_chat_without_the_tui_prints_words(tmp_path, tiny, pulse):
    record = tmp_path / "rec"
    process = subprocess.Popen([*MOSHI, "chat", "--no-tui", "--hf-repo", str(tiny["chat"]), "--record", str(record)],
                               env=_env(tmp_path, pulse), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_recorded(record, 1.5)  # loading, warming up, then some conversation
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            process.kill()  # whatever happened, nothing is left running
    assert process.returncode == 130, stderr  # ended by Ctrl-C
    assert len(stdout.strip()) > 5, (stdout, stderr)  # the tiny model babbles from its first frames
    _, transcript = _check_recording(record)
    assert transcript


def test_output_without_input_is_a_usage_error(tmp_path, tiny):
    result = subprocess.run([*MOSHI, "chat", "--hf-repo", str(tiny["chat"]), "--output", str(tmp_path / "x.wav")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--output" in result.stderr and "--input" in result.stderr
