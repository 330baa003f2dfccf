import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
import soundfile as sf

from audio.errors import AudioFileError
from audio.wav import WavWriter

BLOCK = 1920
# Block k holds a ramp on the left and a tone on the right, both computable from k alone.
WRITER_SCRIPT = """
import sys, numpy as np
from audio.wav import WavWriter
def block(k):
    t = np.arange(k * 1920, (k + 1) * 1920)
    return ((t % 4000) / 4000.0 - 0.5).astype(np.float32), (0.5 * np.sin(t * 0.05)).astype(np.float32)
w = WavWriter(sys.argv[1], 24000, channels=2)
k = 0
while True:
    w.write(*block(k))
    k += 1
    print(k, flush=True)
"""


def expected_blocks(n):
    t = np.arange(n * BLOCK)
    return np.stack([(t % 4000) / 4000.0 - 0.5, 0.5 * np.sin(t * 0.05)], axis=1)


@pytest.mark.parametrize("kill_after_s", [0.0, 0.013, 0.037, 0.05])
def test_killed_writer_leaves_a_valid_file(tmp_path, kill_after_s):
    path = tmp_path / "rec.wav"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 20:
                break
        time.sleep(kill_after_s)  # the writer keeps going: the kill lands at an arbitrary point
        proc.send_signal(signal.SIGKILL)  # no cleanup, no close: the worst case
    finally:
        proc.wait(10)
    reported = int(line)
    data, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and data.shape[1] == 2
    blocks = len(data) / BLOCK
    # Every block the writer reported is there, and nothing torn.
    assert blocks == int(blocks) and blocks >= reported
    assert np.abs(data - expected_blocks(int(blocks))).max() < 1.5 / 32767
    with wave.open(str(path)) as w:  # a second, strict reader agrees on the header
        assert w.getnframes() == len(data) and w.getnchannels() == 2 and w.getsampwidth() == 2


def test_file_is_valid_after_every_block(tmp_path):
    path = tmp_path / "grow.wav"
    with WavWriter(path, 24000, channels=2) as w:
        assert sf.info(path).frames == 0
        for k in range(5):
            w.write(np.full(100, 0.25), np.full(100, -0.25))
            data, _ = sf.read(path)
            assert len(data) == 100 * (k + 1)
            assert np.allclose(data, [0.25, -0.25], atol=1e-4)


def test_clips_instead_of_wrapping(tmp_path):
    with WavWriter(tmp_path / "c.wav", 24000, channels=1) as w:
        w.write(np.array([2.0, -3.0, 0.5]))
    data, _ = sf.read(tmp_path / "c.wav", dtype="int16")
    assert list(data) == [32767, -32767, 16384]


def test_unwritable_path(tmp_path):
    with pytest.raises(AudioFileError, match="cannot write recording"):
        WavWriter(tmp_path / "missing-dir" / "r.wav", 24000)


def test_full_disk_is_a_clear_error():
    with pytest.raises(AudioFileError, match="cannot write recording /dev/full: No space left"):
        WavWriter("/dev/full", 24000)


def test_a_symlink_at_the_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "r.wav").symlink_to(victim)
    with WavWriter(tmp_path / "r.wav", 24000, channels=1) as w:
        w.write(np.zeros(10))
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "r.wav").is_symlink() and sf.info(tmp_path / "r.wav").frames == 10
