"""Session files: complete while the conversation runs, and after the process is killed; the
atomic replacement the JSON files are written with."""

import json
import subprocess
import sys

import numpy as np
import soundfile as sf

from audio.outputs import write_atomically
from engine.options import Mode
from moshi_tui.recording import SessionRecorder, new_session_folder

SR = 24000


def _frames(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, 1920).astype(np.float32) for _ in range(n)]


def test_files_are_complete_during_and_after_the_conversation(tmp_path):
    folder = new_session_folder(tmp_path, Mode.CHAT)
    assert folder.parent == tmp_path and folder.name.endswith("-chat")
    assert new_session_folder(tmp_path, Mode.CHAT) != folder  # a restart in the same second
    rec = SessionRecorder(folder, Mode.CHAT, {"model": "tiny", "device": "cpu"})
    user, moshi = _frames(5, 0), _frames(5, 1)
    moshi[0] = None  # Moshi has not spoken yet
    for u, m in zip(user, moshi):
        rec.frame(u, m)
    rec.text(0.24, " Hello")
    rec.text(0.40, " there")
    rec.user_speech(3.0, True)
    rec.user_speech(3.5, False)
    rec.text(5.0, " Fine.")
    # still running: everything so far is on disk
    expected = "[00:00] moshi: Hello there\n[00:03] (you spoke)\n[00:05] moshi: Fine."
    assert (folder / "transcript.txt").read_text() == expected
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "speech", "speech"]
    assert events[0]["model"] == "tiny" and events[1] == {**events[1], "t": 3.0, "speaking": True}
    wav, rate = sf.read(folder / "audio.wav", dtype="float32")
    assert rate == SR and wav.shape == (5 * 1920, 2)
    rec.close()
    assert (folder / "transcript.txt").read_text().endswith("Fine.\n")
    doc = json.loads((folder / "transcript.json").read_text())
    assert doc["pieces"] == [{"t": 0.24, "text": " Hello"}, {"t": 0.4, "text": " there"}, {"t": 5.0, "text": " Fine."}]
    assert [p["speaker"] for p in doc["paragraphs"]] == ["moshi", "you", "moshi"]
    wav, _ = sf.read(folder / "audio.wav", dtype="float32")
    np.testing.assert_allclose(wav[:, 0], np.concatenate(user), atol=1 / 32767)
    np.testing.assert_allclose(wav[:1920, 1], 0)
    np.testing.assert_allclose(wav[1920:, 1], np.concatenate(moshi[1:]), atol=1 / 32767)
    assert json.loads((folder / "events.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_transcribe_records_the_user_in_mono_without_speaker_labels(tmp_path):
    rec = SessionRecorder(tmp_path, Mode.TRANSCRIBE, {})
    rec.frame(_frames(1, 0)[0])
    rec.text(0.1, " so this")
    rec.user_speech(2.0, True)
    rec.text(2.5, " works")
    rec.close()
    assert (tmp_path / "transcript.txt").read_text() == "[00:00] so this\n[00:02] works\n"
    assert sf.info(tmp_path / "audio.wav").channels == 1


def test_a_killed_process_leaves_valid_files(tmp_path):
    script = f"""
import os, signal, numpy as np
from pathlib import Path
from engine.options import Mode
from moshi_tui.recording import SessionRecorder
rec = SessionRecorder(Path({str(tmp_path)!r}), Mode.CHAT, {{"model": "tiny"}})
for i in range(25):
    rec.frame(np.full(1920, 0.1, np.float32), np.full(1920, -0.1, np.float32))
    rec.text(i * 0.08, f" w{{i}}")
    rec.event("stats", t=i * 0.08)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == -9
    wav, _ = sf.read(tmp_path / "audio.wav", dtype="float32")
    assert wav.shape == (25 * 1920, 2)
    assert (tmp_path / "transcript.txt").read_text() == "[00:00] moshi: " + " ".join(f"w{i}" for i in range(25))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 26 and all(json.loads(line) for line in lines)
    doc = json.loads((tmp_path / "transcript.json").read_text())  # valid, maybe a second behind
    assert doc["model"] == "tiny"


def test_the_json_is_replaced_whole_and_never_through_a_link(tmp_path):
    target, victim = tmp_path / "transcript.json", tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "transcript.json.tmp").symlink_to(victim)  # planted where the temporary file goes
    write_atomically(target, '{"a": 1}')
    assert victim.read_text() == "keep me"
    assert target.read_text() == '{"a": 1}' and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transcript.json", "victim.txt"]


def test_a_temporary_file_left_by_a_killed_run_is_replaced(tmp_path):
    (tmp_path / "talk.json.tmp").write_text('{"half": ')
    write_atomically(tmp_path / "talk.json", "{}\n")
    assert (tmp_path / "talk.json").read_text() == "{}\n" and not (tmp_path / "talk.json.tmp").exists()


def test_session_files_replace_a_symlink_at_their_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "session"
    folder.mkdir()
    for name in ("audio.wav", "transcript.txt", "events.jsonl", "transcript.json"):
        (folder / name).symlink_to(victim)
    recorder = SessionRecorder(folder, Mode.CHAT, {"model": "tiny"})
    recorder.text(0.0, "hello")
    recorder.close()
    assert victim.read_text() == "keep me"
    assert not any(p.is_symlink() for p in folder.iterdir())
    assert "hello" in (folder / "transcript.txt").read_text()
