"""The layering rules, read from the source and checked in fresh interpreters:

- `audio/` (real-time audio, numpy only) imports no torch, no Textual, nothing of `engine/` or `moshi_tui/`;
- `engine/` (the models) imports no Textual and nothing of `moshi_tui/`; of `audio/` it reads only
  the stream format (`audio/__init__.py`) and the lag bounds (`audio/lag.py`), never devices;
- the session pump (`moshi_tui/session.py` and what it imports) runs headless: no Textual, no torch;
- the app's process never imports torch: the model lives in the engine process.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engine": {"textual", "moshi_tui"},
    "audio": {"textual", "moshi_tui", "engine", "torch"},
}
# The only modules of `audio` the engine may import: plain facts, no devices or threads.
ENGINE_MAY_IMPORT_FROM_AUDIO = {"audio", "audio.lag"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _offenders(package: str, allowed=lambda module: False) -> dict[str, list[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {}
    for f in files:
        bad = sorted(m for m in _imported_modules(f) if m.split(".")[0] in FORBIDDEN[package] and not allowed(m))
        if bad:
            offenders[str(f.relative_to(ROOT))] = bad
    return offenders


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package):
    assert _offenders(package) == {}


def test_the_engine_reads_only_facts_from_the_audio_layer():
    files = sorted((ROOT / "engine").rglob("*.py"))
    used = {m for f in files for m in _imported_modules(f) if m.split(".")[0] == "audio"}
    assert used <= ENGINE_MAY_IMPORT_FROM_AUDIO, sorted(used - ENGINE_MAY_IMPORT_FROM_AUDIO)


@pytest.mark.parametrize("modules, heavy", [
    ("moshi_tui.session", ("textual", "torch")),  # the --no-tui pump
    ("audio.core, audio.duplex, audio.files", ("textual", "torch", "engine")),
    ("moshi_tui.session, moshi_tui.app, engine.process, engine.interface", ("torch",)),  # the app's process
])
def test_what_a_fresh_interpreter_loads(modules, heavy):
    code = f"import sys, {modules}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
