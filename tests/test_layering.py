"""The layering rules, read from the source: `engine/` and `audio/` never import Textual or the
TUI; of `audio/` the engine reads only the stream format (`audio/__init__.py`), never devices; and
`audio/` never imports torch."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engine": {"textual", "moshi_tui"},
    "audio": {"textual", "moshi_tui", "engine", "torch"},
}
# The only modules of `audio` the engine may import: plain facts, no devices or threads.
ENGINE_MAY_IMPORT_FROM_AUDIO = {"audio"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f)
                                                  if m.split(".")[0] in FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_the_engine_reads_only_facts_from_the_audio_layer():
    files = sorted((ROOT / "engine").rglob("*.py"))
    used = {m for f in files for m in _imported_modules(f) if m.split(".")[0] == "audio"}
    assert used <= ENGINE_MAY_IMPORT_FROM_AUDIO, sorted(used - ENGINE_MAY_IMPORT_FROM_AUDIO)
