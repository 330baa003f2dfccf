"""`moshi --help`, the commands' help and `moshi devices` stay light: they never import torch
(checked in a fresh interpreter, the way a user runs them)."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys
    sys.argv = ["moshi", *{args!r}]
    from moshi_tui.cli import app
    try:
        app()
    except SystemExit:
        pass
    except Exception as exc:  # no sound device here is fine: the import path is what is checked
        print(f"{{type(exc).__name__}}: {{exc}}", file=sys.stderr)
    heavy = sorted(name for name in ("torch", "sentencepiece", "safetensors") if name in sys.modules)
    print("HEAVY", heavy)
""")


@pytest.mark.parametrize("args", [["--help"], ["devices"], ["chat", "--help"], ["transcribe", "--help"],
                                  ["see", "--help"], ["doctor", "--help"]])
def test_no_torch_for(args):
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout + result.stderr
