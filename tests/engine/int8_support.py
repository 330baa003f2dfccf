"""What the native kernels' int8 path states it does to the activations, computed independently:
x in blocks of 32 inputs (or whole rows, for weights with one scale a row), each with
d = max|x| / 127 and codes round(x · (127 / max|x|)) in fp32."""

import torch


def q8_picture(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] as the int8 path quantizes it, in float64, and each input's block scale d."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / max|x| as one fp32 division (PyTorch's ``127 / tensor`` multiplies by a reciprocal, which
    # can round differently); then the fp32 product rounded to the nearest code, ties to even
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)
    codes = torch.round(blocks * inverse)
    d = (amax / 127).expand_as(blocks)
    return (codes.double() * d.double()).reshape(x.shape), d.reshape(x.shape).double()


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The most x's rounding can move x · Wᵀ: each input at most d/2 off, Σ_k |W[n, k]| · d_k / 2."""
    flat = x.reshape(-1, x.shape[-1])
    _, d = q8_picture(flat, block)
    return (0.5 * d @ weight.double().abs().T).view(*x.shape[:-1], weight.shape[0])
