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
    heavy = sorted(name for name in {heavy!r} if name in sys.modules)
    print("HEAVY", heavy)
""")


MODELS = ("torch", "sentencepiece", "safetensors")


@pytest.mark.parametrize("args, heavy", [
    # Help only reads the command line's declarations: not even numpy (100 ms of a 200 ms start).
    (["--help"], MODELS + ("numpy",)), (["chat", "--help"], MODELS + ("numpy",)),
    (["transcribe", "--help"], MODELS + ("numpy",)), (["see", "--help"], MODELS + ("numpy",)),
    (["doctor", "--help"], MODELS + ("numpy",)), (["serve", "--help"], MODELS + ("numpy", "aiohttp")),
    (["devices"], MODELS),  # the audio layer needs numpy
])
def test_no_torch_for(args, heavy):
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=heavy)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout + result.stderr
