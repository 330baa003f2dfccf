"""Kyutai's checkpoint formats beyond the official PyTorch layout, told apart by what a file holds
(tensor names, a GGUF header), never by its name alone.

The official PyTorch layout (``-pytorch-bf16``, ``-pytorch-q8``) is read by ``engine/moshi/loading.py``.
Each other format is a module of this package with one entry in ``FORMATS``; ``detect`` picks the
entry whose ``matches`` accepts a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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
        checkpoint's config.json keys, or None when it has none (the sizes then come from the shapes)."""


from .mlx import MLX_FORMATS  # noqa: E402 (the formats implement Format, above)

FORMATS: list[Format] = [*MLX_FORMATS]


def detect(path: Path) -> Format | None:
    """The format of an LM file, or None for the official PyTorch layout."""
    return next((fmt for fmt in FORMATS if fmt.matches(path)), None)
