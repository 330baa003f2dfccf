"""Options that cannot go together are refused, in one line, before anything loads."""

import subprocess
import sys


def _moshi(*args):
    return subprocess.run([sys.executable, "-m", "moshi_tui", *args], capture_output=True, text=True, timeout=60)


def test_a_voice_with_a_model_folder_is_refused(tmp_path):
    result = _moshi("chat", "--voice", "moshiko", "--hf-repo", str(tmp_path), "--no-tui")
    assert result.returncode == 2
    assert "--hf-repo names the model, and with it the voice" in result.stderr
