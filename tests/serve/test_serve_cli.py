"""`moshi serve`'s bad arguments: one line each, before the model loads."""

import socket
import subprocess
import sys

import pytest

from .support import env


def _serve(*args):
    return subprocess.run([sys.executable, "-m", "moshi_tui", "serve", *args], capture_output=True, text=True,
                          env=env(), timeout=60)


@pytest.mark.parametrize("args, says", [
    (["--ssl", "/nonexistent"], "no cert.pem"),
    (["--static", "/nonexistent"], "not a folder"),
])
def test_bad_folders(args, says, tmp_path):
    result = _serve(*args, "--hf-repo", str(tmp_path / "no-model"))
    assert result.returncode == 2 and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_port_in_use():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--hf-repo", "/nonexistent")
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
