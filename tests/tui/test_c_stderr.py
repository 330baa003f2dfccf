"""While a session runs, what C libraries write to file descriptor 2 (ALSA prints "underrun
occurred" there) goes to the log, not onto the screen the app draws or between a headless run's lines."""

import subprocess
import sys
import textwrap


def test_c_writes_go_to_the_log_and_the_app_still_reaches_the_terminal(tmp_path):
    log = tmp_path / "engine.log"
    script = textwrap.dedent(f"""
        import os, sys
        from moshi_tui.terminal import native_noise_into
        with native_noise_into({str(log)!r}):
            os.write(2, b"ALSA lib pcm.c: underrun occurred\\n")  # as a C library writes
            sys.__stderr__.write("drawn by the app\\n")  # where Textual draws
            print("a Python warning", file=sys.stderr)
        os.write(2, b"after the app\\n")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "drawn by the app\na Python warning\nafter the app\n"
    assert log.read_text() == "ALSA lib pcm.c: underrun occurred\n"
