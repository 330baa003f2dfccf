"""Kyutai's checkpoint formats beyond the official PyTorch layout, told apart by what a file holds
(tensor names, a GGUF header), never by its name alone.

The official PyTorch layout (``-pytorch-bf16``, ``-pytorch-q8``) is read by ``engine/moshi/loading.py``.
Each other format is a module of this package with one entry in ``FORMATS``; ``detect`` picks the
entry whose ``matches`` accepts a file. Importing this package loads neither torch nor numpy (the
checkpoint resolver reads ``lm_files``): a format imports them where it reads a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from ..moshi.model import LMModel


class Format(Protocol):
    """One checkpoint format of the Moshi LM."""

    name: str  # shown to the user: "candle-q8", "mlx-q4", "transformers", ...
    lm_files: tuple[str, ...]  # the LM file names its repos ship, for a repo without config.json

    def matches(self, path: Path) -> bool:
        """Whether this file is in this format, read from its content."""

    def load_lm(self, path: Path, lm_config: dict | None, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
        """The LM in our modules; a quantized file stays quantized in memory. ``lm_config``: the
        checkpoint's config.json keys, or None when it has none (then ``shapes.lm_config_from_shapes``)."""


# The formats implement Format, above.
from .candle import CANDLE_BF16, CANDLE_Q8  # noqa: E402
from .mlx import MLX_FORMATS  # noqa: E402
from .transformers import TRANSFORMERS  # noqa: E402

FORMATS: list[Format] = [CANDLE_Q8, CANDLE_BF16, *MLX_FORMATS, TRANSFORMERS]

_OFFICIAL_KEYS = ("text_emb.weight", "out_norm.alpha", "emb.0.weight")


def check_official_layout(keys, path: Path) -> None:
    """A one-line CheckpointError, before any weight is read, for a safetensors file that is not in
    the official layout nor any of ``FORMATS``: a Mimi codec, or no layout we know."""
    keys = set(keys)
    if any(key.startswith("quantizer.semantic_residual_vector_quantizer.") for key in keys):
        raise CheckpointError(f"{path} is a Mimi codec in the transformers layout, not a language model")
    if not keys & set(_OFFICIAL_KEYS):
        raise CheckpointError(f"{path} has none of a Moshi language model's tensors ({', '.join(_OFFICIAL_KEYS)}): "
                              "not a checkpoint layout moshi knows")


def detect(path: Path) -> Format | None:
    """The format of an LM file, or None for the official PyTorch layout."""
    return next((fmt for fmt in FORMATS if fmt.matches(path)), None)
