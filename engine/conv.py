"""Causal 1-d convolutions that can run a stream chunk by chunk, as Mimi's SEANet needs.

A conv keeps the last ``k_eff - stride`` input samples between calls and prepends them to the
next chunk; a transposed conv keeps the ``kernel - stride`` output samples that the next chunk
still adds to. Outside streaming, a call runs the same code on a fresh state, so a whole
signal gives exactly what the chunks would (left padding only, never right padding).

A streaming call has few output steps (2 for Mimi's heaviest layers), so a conv is then a
matrix-vector product whose cost is reading its weight, and PyTorch's conv kernels read it slowly
(3-4 GB/s; 33 ms for the decoder's 33 MB transposed conv on an AMD EPYC). With ``exact=False``
such calls are computed as one matrix product that MKL streams 2-10x faster. The sums then round
differently (about 1e-6 relative), so Mimi uses it where the output need not be bit-identical
to the reference (decoding, and encoding unless asked to be exact); ``exact=True`` keeps the
kernels the reference calls.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import StreamingModule, StreamingState

# Output steps per call up to which the matrix product beats the conv kernels (measured: from
# about 100 steps on, the kernels' compute efficiency wins over reading the weight faster).
_MATMUL_MAX_STEPS = 16


class Nested(nn.Module):
    """Holds one module under a given attribute name and calls it.

    The official checkpoint nests each conv one or two levels deeper than the maths needs
    (weight-norm wrappers at training time, resampling wrappers), and strict loading wants
    the same key names: ``encoder.model.0.conv.conv.weight``.
    """

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.inner_name = name
        setattr(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.inner_name)(x)


def _best_times(*products) -> list[float]:
    """Each product's best of four runs, taken in turn (so that all see the same load)."""
    times = [[] for _ in products]
    for _ in range(4):
        for spent, product in zip(times, products):
            start = time.perf_counter()
            product()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    """An 8 MB weight (beyond the per-core caches) and two rows; no draw from the seeded RNG."""
    return torch.full((2048, 1024), 0.5), torch.full((2, 1024), 0.5)


@functools.cache
def weight_on_left(device_type: str) -> bool:
    """Whether this CPU's BLAS reads a weight clearly faster for ``W · xᵀ`` than for ``x · Wᵀ`` when
    x has a few rows. It depends on the CPU: MKL streams the first 2-3x faster on an AMD EPYC, and
    2x slower on an Intel Xeon with AMX, so it is timed once per process. Off the CPU, the usual
    ``x · Wᵀ``. The margin keeps a close call from going either way from one run to the next."""
    if device_type != "cpu":
        return False
    weight, rows = _probe()
    left, right = _best_times(lambda: torch.mm(weight, rows.t()), lambda: torch.mm(rows, weight.t()))
    return 1.5 * left < right


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a few rows of ``x [..., K]``, bound by reading the weight
    ``[M, K]``: in the layout this CPU reads it fastest (``weight_on_left``). The sums round
    differently from ``F.linear``'s (about 1e-7 relative) where that is ``W · xᵀ``."""
    if not weight_on_left(x.device.type):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    return torch.mm(weight, rows.t()).t().reshape(*x.shape[:-1], weight.shape[0])


class Bf16Weight:
    """A weight ``[M, K]`` rounded to bfloat16 and packed once in oneDNN's layout: ``self(x)`` is
    ``F.linear(x, weight)`` with x rounded to bfloat16 too and the sums kept in fp32 (about 3e-3
    relative), reading half the bytes."""

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), 2)
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        return y.float().reshape(*x.shape[:-1], self.out_features)


@functools.cache
def bf16_pays(device_type: str) -> bool:
    """Whether ``Bf16Weight`` products are worth taking: where the CPU multiplies bfloat16 itself
    (AMX or AVX512-BF16; measured on a Xeon with AMX, Mimi decodes in a fifth less time), not where
    oneDNN would convert every value first (AVX2, plain AVX-512), nor off the CPU. A cached weight
    reads as fast in either precision, so timing a probe here would not tell."""
    return (device_type == "cpu" and torch.backends.mkldnn.is_available()
            and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))


def bf16_weight(owner: nn.Module, weight: torch.Tensor) -> Bf16Weight | None:
    """A weight ``[M, K]`` of ``owner`` (or a view of one) as a ``Bf16Weight``, packed on first use
    and kept in ``owner.packed``, where the owner takes bfloat16 (``owner.half``) and it pays
    here; else None."""
    if not owner.half or not bf16_pays(weight.device.type):
        return None
    key = (weight.data_ptr(), tuple(weight.shape))
    if key not in owner.packed:
        owner.packed[key] = Bf16Weight(weight)
    return owner.packed[key]


def conv1d_matmul(x: torch.Tensor, conv: nn.Conv1d, half: Bf16Weight | None = None) -> torch.Tensor:
    """``conv(x)`` (no padding, groups 1) as one product of the weight with the input's windows
    (``half``: the weight as ``[out, in · kernel]`` in bfloat16)."""
    batch = x.shape[0]
    out_channels, _, kernel = conv.weight.shape
    dilation = conv.dilation[0]
    windows = x.unfold(-1, (kernel - 1) * dilation + 1, conv.stride[0])[..., ::dilation]  # [B, C, T, K]
    steps = windows.shape[2]
    rows = windows.permute(0, 2, 1, 3).reshape(batch * steps, -1)
    y = half(rows) if half is not None else few_rows_linear(rows, conv.weight.view(out_channels, -1))
    if conv.bias is not None:
        y += conv.bias
    return y.view(batch, steps, out_channels).transpose(1, 2)


def conv_transpose1d_matmul(x: torch.Tensor, convtr: nn.ConvTranspose1d, half: Bf16Weight | None = None) -> torch.Tensor:
    """``convtr(x)`` (groups 1) as ``x · W`` then the overlap-add of the kernel-long pieces
    (``half``: ``Wᵀ``, ``[out · kernel, in]``, in bfloat16)."""
    batch, in_channels, steps = x.shape
    _, out_channels, kernel = convtr.weight.shape
    stride = convtr.stride[0]
    rows = x.transpose(1, 2).reshape(batch * steps, in_channels)
    pieces = half(rows) if half is not None else torch.mm(rows, convtr.weight.view(in_channels, -1))
    pieces = pieces.view(batch, steps, -1).transpose(1, 2)
    length = (steps - 1) * stride + kernel
    y = F.fold(pieces, (1, length), (1, kernel), stride=(1, stride)).view(batch, out_channels, length)
    if convtr.bias is not None:
        y += convtr.bias[:, None]
    return y


def _where_reset(mask: torch.Tensor | None, fresh: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return fresh.expand_as(current)
    return torch.where(mask.view(-1, *([1] * (current.dim() - 1))), fresh, current)


@dataclass
class ConvState(StreamingState):
    previous: torch.Tensor  # [B, C_in, k_eff - stride], the input tail of the last call
    first: torch.Tensor  # [B] bool, no call yet since the last reset (for replicate padding)

    def reset(self, mask: torch.Tensor | None) -> None:
        self.previous.copy_(_where_reset(mask, torch.zeros_like(self.previous), self.previous))
        self.first.copy_(_where_reset(mask, torch.ones_like(self.first), self.first))


class StreamingConv1d(StreamingModule):
    """Causal conv; ``replicate=True`` pads a stream's start with its first sample instead of zeros."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        replicate: bool = False,
        exact: bool = True,
        half: bool = False,
    ):
        super().__init__()
        self.replicate = replicate
        self.exact = exact
        self.half = half  # with exact False: bfloat16 weights where the CPU gains by it (``bf16_pays``)
        self.packed: dict[tuple, Bf16Weight] = {}
        self.conv = Nested(
            "conv",
            nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias),
        )
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def init_state(self, batch_size: int) -> ConvState:
        weight = self.conv.conv.weight
        previous = torch.zeros(batch_size, self.conv.conv.in_channels, self.context, dtype=weight.dtype,
                               device=weight.device)
        first = torch.ones(batch_size, dtype=torch.bool, device=weight.device)
        return ConvState(batch_size, weight.device, previous=previous, first=first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T = x.shape
        if T == 0 or T % self.stride:
            raise ValueError(f"conv input length {T} is not a positive multiple of its stride {self.stride}")
        state = self.state if self.state is not None else self.init_state(B)
        if not self.context:
            return self._convolve(x)
        if self.replicate:
            state.previous.copy_(torch.where(state.first.view(-1, 1, 1), x[..., :1], state.previous))
            state.first.fill_(False)
        x = torch.cat([state.previous, x], dim=-1)
        y = self._convolve(x)
        state.previous.copy_(x[..., -self.context:])
        return y

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv.conv
        steps = (x.shape[-1] - self.context) // self.stride
        if self.exact or conv.groups != 1 or steps > _MATMUL_MAX_STEPS:
            return conv(x)
        return conv1d_matmul(x, conv, bf16_weight(self, conv.weight.view(conv.out_channels, -1)))


@dataclass
class ConvTransposeState(StreamingState):
    partial: torch.Tensor  # [B, C_out, kernel - stride], overlap not yet complete, bias excluded

    def reset(self, mask: torch.Tensor | None) -> None:
        self.partial.copy_(_where_reset(mask, torch.zeros_like(self.partial), self.partial))


class StreamingConvTranspose1d(StreamingModule):
    """Causal transposed conv: each call emits ``T·stride`` samples that later calls never change."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        exact: bool = True,
        half: bool = False,
    ):
        super().__init__()
        self.exact = exact
        self.half = half  # as StreamingConv1d's
        self.packed: dict[tuple, Bf16Weight] = {}
        self.convtr = Nested(
            "convtr", nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        )
        self.overlap = kernel_size - stride

    def init_state(self, batch_size: int) -> ConvTransposeState:
        weight = self.convtr.convtr.weight
        partial = torch.zeros(batch_size, self.convtr.convtr.out_channels, self.overlap, dtype=weight.dtype,
                              device=weight.device)
        return ConvTransposeState(batch_size, weight.device, partial=partial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convtr = self.convtr.convtr
        if self.exact or convtr.groups != 1 or x.shape[-1] > _MATMUL_MAX_STEPS:
            y = convtr(x)
        else:
            y = conv_transpose1d_matmul(x, convtr, bf16_weight(self, convtr.weight.view(convtr.in_channels, -1).t()))
        overlap = self.overlap
        if not overlap:
            return y
        if self.state is None:
            return y[..., :-overlap]
        partial = self.state.partial
        y[..., :overlap] += partial
        tail = y[..., -overlap:]
        bias = self.convtr.convtr.bias
        # The tail already holds the bias; the next call's output adds it again.
        partial.copy_(tail - bias[:, None] if bias is not None else tail)
        return y[..., :-overlap]
