"""What the CLI tells the engine about the model to run. Importing this is cheap: no torch,
so the TUI process can use it."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("bfloat16", "float16", "float32")


@dataclass
class ModelOptions:
    """None means "what the checkpoint says" (its ``lm_gen_config``, else the reference defaults)."""

    hf_repo: str | None = None  # model name ("moshika"), repo id, or local folder
    device: str = "cpu"
    dtype: str = "bfloat16"
    quantize: str | None = None  # "int8" | "int4": the LM's linears, at load time (a q8 checkpoint is int8 anyway)
    seed: int | None = None
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None


@dataclass
class SeeOptions(ModelOptions):
    """MoshiVis: the model options plus the picture and how the model looks at it."""

    image: str | None = None  # the picture's path
    xa_start: int | None = None  # steps before Moshi looks at the picture; None: the checkpoint's (16)
    rms_norm: str | None = None  # None: the checkpoint's


def gate_level(gate: float) -> int:
    """0..10, as the official MoshiVis server scales the gate to colour words (moshivis.md §6)."""
    return round(min(max((gate - 0.005) / 0.016, 0.0), 1.0) * 10)
