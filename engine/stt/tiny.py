"""Tiny random STT checkpoints, for ``moshi tiny-model --kind transcribe`` and the tests."""

from __future__ import annotations

from pathlib import Path

from ..moshi.model import LMConfig
from ..moshi.tiny import write_tiny_lm_checkpoint


def write_tiny_stt_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """A speech-recognition model for `moshi transcribe`: greedy, its text half a second behind the audio."""
    return write_tiny_lm_checkpoint(
        folder, LMConfig.tiny_stt(), seed, model_type="stt",
        lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
        stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0})
