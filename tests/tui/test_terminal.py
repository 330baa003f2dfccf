"""The real command in a real terminal (tmux, 80x24): the full-screen view comes up, goes live
with the tiny checkpoint and the sound server, and ends cleanly on q, Ctrl-C, SIGTERM and SIGHUP
(exit status 0, 130, 143, 129); a killed engine is reported, the exit status is 1. Each time the
terminal is restored (cooked mode, main screen, no mouse tracking, the cursor shown) and nothing is
left running."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import children, gone

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"),
]
MOSHI = [sys.executable, "-m", "moshi_tui"]  # this tree's moshi (PYTHONPATH), not the installed script


class Terminal:
    """A detached tmux session running one command; the pane stays after the command exits."""

    def __init__(self, tmp_path: Path, argv: list[str], env: dict[str, str], size=(80, 24)) -> None:
        self.socket = f"moshi-test-{os.getpid()}-{id(self)}"
        self.rc_file = tmp_path / "rc"
        self.stty_file = tmp_path / "stty"
        command = (f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.rc_file))}; "
                   f"stty -a > {shlex.quote(str(self.stty_file))}; sleep 600")
        self._tmux("new-session", "-d", "-x", str(size[0]), "-y", str(size[1]), command, env=env)

    def _tmux(self, *args, env=None) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              env=env).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def press(self, key: str) -> None:
        self._tmux("send-keys", key)

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The screen, once it matches the regular expression."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen()}")

    def exit_status(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.rc_file.exists() and self.rc_file.read_text().strip():
                return int(self.rc_file.read_text())
            time.sleep(0.1)
        raise AssertionError(f"the command did not exit; the screen:\n{self.screen()}")

    def assert_restored(self) -> None:
        """Once the command has exited: the terminal is as the shell left it."""
        modes = self._tmux("display", "-p", "#{alternate_on} #{mouse_any_flag} #{cursor_flag}").split()
        assert modes == ["0", "0", "1"], "alternate screen, mouse tracking, cursor shown: " + " ".join(modes)
        end = time.monotonic() + 10
        while not (self.stty_file.exists() and self.stty_file.read_text()):
            assert time.monotonic() < end, "stty never ran"
            time.sleep(0.1)
        flags = self.stty_file.read_text().split()
        assert "icanon" in flags and "echo" in flags, "the terminal is left in raw mode"

    def app_pid(self) -> int:
        shell = int(self._tmux("display", "-p", "#{pane_pid}"))
        [(pid, _)] = [c for c in children(shell) if b"moshi" in c[1]]
        return pid

    def close(self) -> None:
        """Kill the terminal, then whatever ran in it that the hang-up did not end (a command that
        outlives its terminal would outlive the test)."""
        try:
            shell = int(self._tmux("display", "-p", "#{pane_pid}"))
        except (subprocess.CalledProcessError, ValueError):  # the pane is gone already: so is what ran in it, as its shell waited for it
            shell = None
        left = [] if shell is None else _descendants(shell)
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        end = time.monotonic() + 10
        while not all(gone(pid) for pid in left) and time.monotonic() < end:
            time.sleep(0.1)
        for pid in left:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def terminal(tmp_path, tiny, pulse):
    env = {**os.environ, **pulse.env, "XDG_DATA_HOME": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "MOSHI_CONFIG": str(tmp_path / "none.toml")}
    env.pop("NO_COLOR", None)
    opened = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(tmp_path, [*MOSHI, *args], env))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def _descendants(pid: int) -> list[int]:
    found = [child for child, _ in children(pid)]
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _engine_pid(app_pid: int) -> int:
    [(pid, _)] = [c for c in children(app_pid) if b"spawn_main" in c[1]]
    return pid


def _sessions(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "data" / "moshi" / "sessions").glob("*-transcribe"))


@pytest.mark.parametrize("end, status", [("q", 0), ("C-c", 130), (signal.SIGINT, 130), (signal.SIGTERM, 143),
                                         (signal.SIGHUP, 129)])
def test_live_view_in_80x24_then_a_clean_exit(terminal, tiny, tmp_path, end, status):
    term = terminal("transcribe", "--hf-repo", str(tiny["transcribe"]))
    screen = term.wait_for("● live")
    lines = screen.rstrip("\n").split("\n")
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    assert "Transcript" in screen and "Latency" in screen and "q Quit" in screen
    app = term.app_pid()
    engine = _engine_pid(app)
    term.wait_for(r"step +\d+\.\d / 80 ms")  # a measured step time in the latency panel
    if isinstance(end, str):
        term.press(end)
    else:
        os.kill(app, end)
    assert term.exit_status() == status
    assert gone(engine)
    assert "Latency" not in term.screen()  # the terminal is back to the shell's screen
    term.assert_restored()
    [folder] = _sessions(tmp_path)
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end"


def test_a_killed_engine_is_reported_and_the_exit_status_is_1(terminal, tiny, tmp_path):
    term = terminal("transcribe", "--hf-repo", str(tiny["transcribe"]))
    term.wait_for("● live")
    app = term.app_pid()
    engine = _engine_pid(app)
    term.wait_for(r"step +\d+\.\d / 80 ms")  # the conversation is under way
    os.kill(engine, signal.SIGKILL)
    term.wait_for("the engine process was killed by SIGKILL", timeout=5)  # in the error panel
    assert term.exit_status() == 1
    screen = term.screen()
    assert "moshi: error: the engine process was killed by SIGKILL" in screen
    assert "Latency" not in screen
    term.assert_restored()
    assert gone(app) and gone(engine)
    [folder] = _sessions(tmp_path)
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events[-2:]] == ["failed", "end"]
    json.loads((folder / "transcript.json").read_text())
