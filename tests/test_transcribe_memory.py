"""An hour-long file must not cost more memory than a minute: peak RSS of the real CLI process on
1 and 10 minutes of 16 kHz audio (read in blocks, resampled as a stream, written as it goes)."""

import json
import os
import subprocess

import pytest
import soundfile

from transcribe_support import ENV, moshi_command, noise, stt_folder

# Loading 10 minutes whole would add about 100 MB (16 kHz and 24 kHz float32 copies); block reading
# leaves a few MB of Python allocator noise and the transcript itself.
ALLOWED_GROWTH_MB = 20


def _write_minutes(path, minutes):
    with soundfile.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as f:
        for i in range(minutes * 6):
            f.write(noise(10, 16000, seed=i))
    return path


def _peak_rss_mb(folder, path, out):
    process = subprocess.Popen(moshi_command("transcribe", "--model", folder, path, "-f", "all", "-o", out, "--stats"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss / 1024, stderr.strip().splitlines()[-1]


def test_memory_stays_flat_from_one_to_ten_minutes(tmp_path):
    folder = stt_folder(tmp_path / "tiny")
    one, one_stats = _peak_rss_mb(folder, _write_minutes(tmp_path / "one.wav", 1), tmp_path / "out")
    ten, ten_stats = _peak_rss_mb(folder, _write_minutes(tmp_path / "ten.wav", 10), tmp_path / "out")
    print(f"peak RSS: 1 min {one:.1f} MB, 10 min {ten:.1f} MB\n{one_stats}\n{ten_stats}")
    assert "600.0 s of audio" in ten_stats
    doc = json.loads((tmp_path / "out" / "ten.json").read_text())
    assert doc["complete"] and doc["duration"] == pytest.approx(600.0) and doc["words"][-1]["end"] > 570
    assert ten - one < ALLOWED_GROWTH_MB
