"""Tiny random checkpoint folders in the official layouts: ``moshi tiny-model`` writes them, to try
the app (and run the tests) without downloading gigabytes. Each family's ``tiny.py`` writes its own;
the models load through exactly the code real checkpoints go through, and produce noise, not speech.
"""

from __future__ import annotations

from pathlib import Path

from .moshi.tiny import write_tiny_moshi_checkpoint
from .options import Mode
from .moshivis.tiny import write_tiny_moshivis_checkpoint
from .stt.tiny import write_tiny_stt_checkpoint

# By the mode that runs the model.
WRITERS = {
    Mode.CHAT: write_tiny_moshi_checkpoint,
    Mode.SEE: write_tiny_moshivis_checkpoint,
    Mode.TRANSCRIBE: write_tiny_stt_checkpoint,
}


def write_tiny_checkpoint(folder: str | Path, kind: Mode | str = Mode.CHAT, seed: int = 0) -> Path:
    """Write a tiny model for ``kind`` (a mode or its name) to ``folder``; returns its path."""
    if kind not in WRITERS:
        raise ValueError(f"kind must be one of {[mode.value for mode in WRITERS]}, not {kind!r}")
    return WRITERS[kind](folder, seed)
