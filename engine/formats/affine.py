"""Linears and embeddings in MLX's affine quantization, kept quantized in memory.

A weight row is cut into groups of ``group_size`` inputs; each value is an unsigned ``bits``-bit
code q with ``w = scale · q + bias``, one bf16 scale and bias per group (the scale may be negative).
The codes are packed into little-endian 32-bit words, lowest bits first, so viewed as bytes an
8-bit row is its codes in order and a 4-bit row holds two codes a byte, the even input in the low
nibble. Modules here store exactly those bytes, scales and biases.

* ``dequantize`` gives the weight in fp32 exactly: ``scale · q`` needs at most 16 significant
  bits, so the one rounding is that of the sum, as in MLX's own dequantization. In fp32 (or on a
  device without a kernel) a linear multiplies by that weight, so the model computes exactly what
  a float model holding the dequantized weights computes.
* In bf16 on a CPU a linear runs on PyTorch's grouped int4 kernel (the one ``Int4Linear`` uses),
  whose convention is ``w = (c − 8) · scale + zero``. A 4-bit code maps onto it with ``zero =
  bias + 8 · scale``; an 8-bit code splits into its two nibbles, ``q = 16·hi + lo``, an int4
  product twice as wide that reads 8 bits a weight in all. The kernel takes its scales and zeros
  in the activations' dtype: rounding ``zero`` to bf16 (and the bf16 activations) make this path
  approximate; its deviation is measured against MLX's own bf16 run in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moshi.model import ZERO_TOKEN
from ..quant import INT4_GROUP_SIZES, _release_pages
# Rows repacked for the int4 kernel at a time (a multiple of its 64-row blocks): the int32 codes the
# packing function takes stay a few MB instead of 0.5 GB for a 32000-row vocabulary projection.
_PACK_ROWS = 1024


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes [rows, in·bits/8] -> uint8 codes [rows, in]."""
    if bits == 8:
        return codes
    return torch.stack([codes & 15, codes >> 4], dim=-1).view(codes.shape[0], -1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weight [rows, in] of packed ``codes`` and their per-group ``scales`` and ``biases``."""
    values = unpack(codes, bits)
    rows, groups = scales.shape
    grouped = values.view(rows, groups, -1).float()
    return (grouped * scales.float()[..., None] + biases.float()[..., None]).view(rows, -1)


class _AffineCodes(nn.Module):
    """A matrix of ``rows`` × ``inputs`` as the file holds it: ``weight`` (the packed codes' bytes),
    ``scales`` and ``biases`` (one per group of ``group_size`` inputs, in ``compute_dtype``)."""

    def __init__(self, rows: int, inputs: int, bits: int, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.weight = nn.Parameter(torch.empty(rows, inputs * bits // 8, dtype=torch.uint8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(rows, inputs // group_size, dtype=compute_dtype), requires_grad=False)
        self.biases = nn.Parameter(torch.empty(rows, inputs // group_size, dtype=compute_dtype), requires_grad=False)


class AffineLinear(_AffineCodes):
    """``y = x · Wᵀ`` with W held as MLX's affine codes; computes in ``compute_dtype``."""

    @property
    def quantization(self) -> str:
        return f"mlx-q{self.bits}"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 compute_dtype: torch.dtype):
        super().__init__(out_features, in_features, bits, group_size, compute_dtype)
        self.in_features, self.out_features = in_features, out_features
        # Once prepared for the kernel: its packed codes, and its scales and zeros [groups, out, 2]
        self.packed: nn.Parameter | None = None
        self.scales_zeros: nn.Parameter | None = None

    def kernel_fits(self) -> bool:
        """Whether the CPU int4 kernel takes this layer: reduced-precision compute on a CPU, a group
        size it supports and a multiple of 16 outputs. fp32 stays on the exact path."""
        return (self.weight.device.type == "cpu" and self.compute_dtype != torch.float32
                and self.group_size in INT4_GROUP_SIZES and self.out_features % 16 == 0)

    def prepare_kernel(self) -> None:
        """Repack the codes for the int4 kernel and drop the file's copy (its pages are released).

        8-bit codes become one int4 matrix twice as wide, [hi | lo], which multiplies [x | x]:
        the kernel sums both halves in its fp32 accumulator and rounds once."""
        scale, bias = self.scales.float(), self.biases.float()
        halves = 2 if self.bits == 8 else 1
        packed = torch.empty(self.out_features, halves * self.in_features // 2, dtype=torch.uint8)
        for start in range(0, self.out_features, _PACK_ROWS):
            rows = slice(start, start + _PACK_ROWS)
            codes = unpack(self.weight[rows], self.bits)
            if self.bits == 8:
                codes = torch.cat([codes >> 4, codes & 15], dim=1)
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # the kernel's w = (c − 8) · scale + zero
        parts = [(scale, bias + 8 * scale)] if self.bits == 4 else [(16 * scale, 128 * scale), (scale, bias + 8 * scale)]
        scales_zeros = torch.cat([torch.stack(part, dim=-1).transpose(0, 1) for part in parts])
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales_zeros = nn.Parameter(scales_zeros.to(self.compute_dtype).contiguous(), requires_grad=False)
        for tensor in (self.weight, self.scales, self.biases):
            _release_pages(tensor)
        self.weight = self.scales = self.biases = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, dequantize(self.weight, self.scales, self.biases, self.bits).to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if self.bits == 8:
            flat = torch.cat([flat, flat], dim=1)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mlx affine {self.bits}-bit, "
                f"group_size={self.group_size}, {'int4 kernel' if self.packed is not None else 'dequantized'}")


class AffineEmbedding(_AffineCodes):
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
