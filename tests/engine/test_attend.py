"""The native decoding-step attention (engine/kernels/attend.c), every build this CPU runs, against
softmax attention computed in float64 from the same bf16 or fp32 ring.

Everything in the kernel is fp32 (dot products, an exponential accurate to ~2e-7, the weighted sum).
A score's fp32 rounding is up to ~1e-7 of S = Σ_d |q_d·k_d| / √D, and it moves the softmax by as
much relative to each weight: for values of unit size the result stays within 1e-6 · (1 + S) of the
float64 one (measured: 2e-7 at S ≈ 7, 1.6e-6 at S ≈ 30).
"""

import pytest
import torch

from engine import kernels

VARIANTS = kernels.runnable_variants()
BOUND = 1e-6


def _bound(q, keys, allowed):
    """1e-6 · (1 + the largest Σ|q·k|/√D of a slot attended)."""
    n = allowed.shape[1]
    magnitude = (q.double().abs() @ keys[:, :, :n].double().abs().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return BOUND * (1 + float(magnitude.nan_to_num(0).max()))


def _reference(q, keys, values, allowed):
    """float64 softmax(q·kᵀ/√D)·v over the first n slots, each batch row over its allowed ones."""
    n = allowed.shape[1]
    q, k, v = q.double(), keys[:, :, :n].double(), values[:, :, :n].double()
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _ring(generator, B, H, capacity, n, D, dtype):
    keys = torch.randn(B, H, capacity, D, generator=generator)
    values = torch.randn(B, H, capacity, D, generator=generator)
    # slots past n hold what an unwritten ring may hold: they must not be read into the result
    keys[:, :, n:], values[:, :, n:] = float("nan"), float("nan")
    return keys.to(dtype), values.to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [16, 64, 128, 256])
def test_one_query_a_head_against_float64(variant, dtype, D):
    generator = torch.Generator().manual_seed(D)
    B, H, capacity, n = 2, 3, 300, 203  # n: no multiple of any vector width
    keys, values = _ring(generator, B, H, capacity, n, D, dtype)
    # a peaked softmax: some slots fall below e^-87 of the largest (the exponential's floor)
    q = (4 * torch.randn(B, H, 1, D, generator=generator)).to(dtype)
    allowed = torch.rand(B, n, generator=generator) > 0.3
    allowed[:, 0] = True
    got = kernels.attend(q, keys, values, allowed, variant=variant)
    assert got.dtype == torch.float32 and got.shape == (B, H, 1, D)
    worst = float((got.double() - _reference(q, keys, values, allowed)).abs().max())
    assert worst < _bound(q, keys, allowed), worst


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_batch_row_attends_its_own_slots(variant):
    """Row 1 may attend only its slot 5: its output is that slot's value exactly, whatever row 0 does."""
    generator = torch.Generator().manual_seed(1)
    keys, values = _ring(generator, 2, 2, 64, 40, 64, torch.float32)
    q = torch.randn(2, 2, 1, 64, generator=generator)
    allowed = torch.ones(2, 40, dtype=torch.bool)
    allowed[1] = False
    allowed[1, 5] = True
    got = kernels.attend(q, keys, values, allowed, variant=variant)
    assert torch.equal(got[1, :, 0], values[1, :, 5])
    worst = float((got.double() - _reference(q, keys, values, allowed)).abs().max())
    assert worst < _bound(q, keys, allowed), worst


def test_threads_split_heads_and_give_the_same_bits():
    generator = torch.Generator().manual_seed(2)
    keys, values = _ring(generator, 1, 8, 500, 333, 128, torch.bfloat16)
    q = torch.randn(1, 8, 1, 128, generator=generator).bfloat16()
    allowed = torch.ones(1, 333, dtype=torch.bool)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.attend(q, keys, values, allowed)
        torch.set_num_threads(2)
        two = kernels.attend(q, keys, values, allowed)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_what_the_kernel_does_not_take_is_refused():
    keys = torch.zeros(1, 2, 10, 64)
    allowed = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="attend"):  # two queries a head
        kernels.attend(torch.zeros(1, 2, 2, 64), keys, keys, allowed)
    with pytest.raises(ValueError, match="attend"):  # keys and values of different dtypes
        kernels.attend(torch.zeros(1, 2, 1, 64), keys, keys.bfloat16(), allowed)
    with pytest.raises(ValueError, match="attend"):  # more slots than the ring has
        kernels.attend(torch.zeros(1, 2, 1, 64), keys, keys, torch.ones(1, 11, dtype=torch.bool))
    assert not kernels.attends(72) and not kernels.attends(512)
