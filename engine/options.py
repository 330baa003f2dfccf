"""What the CLI tells the engine about the model to run. Importing this is cheap: no torch."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("bfloat16", "float16", "float32")
QUANTIZE_NAMES = ("int8", "int4")


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
