"""Embeddings in MLX's affine quantization, kept quantized in memory.

A weight row is cut into groups of ``group_size`` inputs; each value is an unsigned ``bits``-bit
code q with ``w = scale · q + bias``, one bf16 scale and bias per group (the scale may be negative).
The codes are packed into little-endian 32-bit words, lowest bits first, so viewed as bytes an
8-bit row is its codes in order and a 4-bit row holds two codes a byte, the even input in the low
nibble. Modules store exactly those bytes, scales and biases: ``engine.quant.AffineLinear`` for
the linears (with its kernels), ``AffineEmbedding`` here for the tables.
"""

from __future__ import annotations

import torch

from ..moshi.model import ZERO_TOKEN
from ..quant import AffineCodes, dequantize


class AffineEmbedding(AffineCodes):
    """An embedding table in MLX's affine codes; rows are dequantized on lookup (exactly, then cast
    to ``compute_dtype``), and the token -1 gives exact zeros as in the float model."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 compute_dtype: torch.dtype):
        super().__init__(num_embeddings, embedding_dim, bits, group_size, compute_dtype)
        self.embedding_dim = embedding_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.clamp(min=0).reshape(-1)
        values = dequantize(self.weight[rows], self.scales[rows], self.biases[rows], self.bits)
        values = values.to(self.compute_dtype).view(*tokens.shape, self.embedding_dim)
        return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=values.dtype), values)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.embedding_dim}, mlx affine {self.bits}-bit"
