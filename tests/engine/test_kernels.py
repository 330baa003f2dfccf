"""The native grouped kernels (engine/kernels), every build this CPU runs, against the float64
product with the dequantized weight.

The kernel turns each code exactly into its weight (or its exact bf16 value, scaled per group) and
sums in fp32, so it differs from the dequantized product only by fp32 rounding in another order:
bounded here at 1e-6 of Σ|x|·|w| per output (measured, ~5e-8), far below any quantization error.
The shapes take every path: 4-bit groups of 64 and 128 (the table path on AVX-512), of 32 (the bf16
path for bf16 activations with AVX512-BF16), 8-bit codes (fp32), full chunks of 128 inputs and tails.

The int8 path (the builds with AVX512-VNNI, and AVX2's) quantizes the activations as it states, in
blocks of 32 with d = max|x|/127 and codes round(x · (127/max|x|)) in fp32: it must give the float64 product of that
picture of x (the biases' part with x itself) up to fp32 sums, and so stay within d/2 · Σ|w| of the
exact product.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine import kernels
from engine.quant import dequantize

from int8_support import q8_picture, rounding_bound

BOUND = 1e-6
VARIANTS = kernels.runnable_variants()


def test_the_kernels_are_built_where_there_is_a_compiler():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the install falls back to PyTorch's kernels")
    assert "generic" in VARIANTS, "pip install -e . did not build engine/kernels (see setup.py)"


def _check(got, x, weight):
    exact = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    worst = float(((got.double() - exact).abs() / scale).max())
    assert worst < BOUND, worst


def _affine(generator, N, K, bits, group, dtype):
    codes = torch.randint(0, 256, (N, K * bits // 8), dtype=torch.uint8, generator=generator)
    scales = (torch.randn(N, K // group, generator=generator) / 50).to(dtype)
    biases = (torch.randn(N, K // group, generator=generator) / 10).to(dtype)
    return codes, scales, biases


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 64), (8, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_affine_codes_give_the_dequantized_product(variant, bits, group, dtype):
    generator = torch.Generator().manual_seed(bits * group)
    N, K = 72, 640  # N: no multiple of 16 (the kernel takes any); K: 5 groups of 128
    codes, scales, biases = _affine(generator, N, K, bits, group, dtype)
    weight = dequantize(codes, scales, biases, bits)
    for rows in (1, 2, 3, 8, 11):  # 11: two passes over the weight (8 rows, then 3)
        # fp32 activations, and bf16 ones (4-bit codes: the AVX512-BF16 path where built)
        x = torch.randn(rows, K, generator=generator)
        _check(kernels.grouped_matmul(x, codes, bits, group, scales, biases, variant=variant), x, weight)
        x = x.bfloat16()
        _check(kernels.grouped_matmul(x, codes, bits, group, scales, biases, variant=variant), x.float(), weight)


@pytest.mark.parametrize("variant", VARIANTS)
def test_signed_codes_without_biases_give_gguf_q8_0(variant):
    generator = torch.Generator().manual_seed(0)
    N, K = 40, 1024
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=generator)
    scales = (torch.rand(N, K // 32, generator=generator) / 100).half()
    weight = (codes.float().view(N, -1, 32) * scales.float()[..., None]).view(N, K)
    for rows in (1, 4, 9):
        for x in (torch.randn(rows, K, generator=generator), torch.randn(rows, K, generator=generator).bfloat16()):
            got = kernels.grouped_matmul(x, codes.view(N, K // 32, 32), 8, 32, scales, None, signed=True,
                                         variant=variant)
            _check(got, x.float(), weight)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K", [256, 96])  # 96: no multiple of the 64 inputs of a bf16 step, nor of a 128-input chunk
def test_bf16_activations_and_leading_dimensions(variant, bits, K):
    generator = torch.Generator().manual_seed(1)
    codes, scales, biases = _affine(generator, 48, K, bits, 32, torch.bfloat16)
    x = torch.randn(2, 3, K, generator=generator).bfloat16()
    # 96 inputs: no whole step of the int8 path either, which then leaves x as it is
    got = kernels.grouped_matmul(x, codes, bits, 32, scales, biases, variant=variant, int8_activations=K == 96)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    _check(got.view(6, 48), x.float().view(6, K), dequantize(codes, scales, biases, bits))


INT8_VARIANTS = [variant for variant in VARIANTS if kernels.has_int8_path(variant)]


@pytest.mark.parametrize("variant", INT8_VARIANTS)
@pytest.mark.parametrize("bits,group,signed", [(4, 32, False), (4, 64, False), (4, 128, False), (8, 32, False),
                                               (8, 64, False), (8, 32, True)])
def test_int8_activations_give_the_product_of_their_q8_0_picture(variant, bits, group, signed):
    generator = torch.Generator().manual_seed(bits * group + signed)
    N, K = 72, 640
    if signed:  # GGUF's Q8_0
        codes = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=generator)
        scales, biases = (torch.rand(N, K // 32, generator=generator) / 100).half(), None
        coded = (codes.float().view(N, -1, 32) * scales.float()[..., None]).view(N, K)
        offsets = torch.zeros(N, K)
    else:
        codes, scales, biases = _affine(generator, N, K, bits, group, torch.bfloat16)
        coded = dequantize(codes, scales, torch.zeros_like(biases), bits)  # q · scale: exact in fp32
        offsets = biases.float().repeat_interleave(group, dim=1)
    coded, offsets = coded.double(), offsets.double()
    for rows in (1, 2, 3, 8, 11):
        for x in (torch.randn(rows, K, generator=generator), torch.randn(rows, K, generator=generator).bfloat16()):
            got = kernels.grouped_matmul(x, codes, bits, group, scales, biases, signed=signed, variant=variant,
                                         int8_activations=True).double()
            picture, _ = q8_picture(x)
            exact_x = x.double()
            expected = picture @ coded.T + exact_x @ offsets.T
            magnitude = picture.abs() @ coded.abs().T + exact_x.abs() @ offsets.abs().T
            assert ((got - expected).abs() <= 1e-6 * magnitude).all()
            error = (got - exact_x @ (coded + offsets).T).abs()
            assert (error <= rounding_bound(x, coded) + 1e-6 * magnitude).all()
            assert error.max() > 0  # the activations were quantized


@pytest.mark.parametrize("variant", INT8_VARIANTS)
def test_int8_activations_with_one_weight_scale_a_row(variant):
    """Signed codes with one fp32 scale a row (group = K): x is quantized a whole row at a time."""
    generator = torch.Generator().manual_seed(5)
    N, K = 40, 448  # 7 steps of 64 inputs
    codes = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=generator)
    scales = torch.rand(N, 1, generator=generator) / 100
    weight = codes.double() * scales.double()
    for rows in (1, 2, 5, 8, 9):
        for x in (torch.randn(rows, K, generator=generator), torch.randn(rows, K, generator=generator).bfloat16()):
            got = kernels.grouped_matmul(x, codes, 8, K, scales, None, signed=True, variant=variant,
                                         int8_activations=True).double()
            picture, _ = q8_picture(x, K)
            assert ((got - picture @ weight.T).abs() <= 1e-6 * (picture.abs() @ weight.abs().T)).all()
            error = (got - x.double() @ weight.T).abs()
            assert 0 < error.max() and (error <= rounding_bound(x, weight, K) + 1e-6 * (x.double().abs() @ weight.abs().T)).all()
    with pytest.raises(ValueError, match="not a shape this kernel takes"):  # one scale a row: int8 path only
        kernels.grouped_matmul(x, codes, 8, K, scales, None, signed=True, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_outputs_are_the_fp32_ones_rounded_as_pytorch_rounds(variant):
    """The kernel writes bf16 itself: bit for bit ``.to(torch.bfloat16)`` of its fp32 result, ties
    to even included, on every path; NaN where that has NaN."""
    generator = torch.Generator().manual_seed(6)
    codes, scales, biases = _affine(generator, 40, 256, 4, 64, torch.bfloat16)
    x = torch.randn(3, 256, generator=generator) * torch.tensor([[1.0], [1e3], [1e-3]])
    # Q8_0 codes times 3 at one-hot inputs: integers up to 384, the odd ones above 256 halfway
    # between two bf16 values
    signed = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=generator)
    three = torch.full((64, 8), 3.0, dtype=torch.float16)
    one_hot = torch.eye(256)[:8]
    with_nan = x.clone()
    with_nan[1, 7] = float("nan")
    cases = [(x, codes, 4, 64, scales, biases, False), (x.bfloat16(), codes, 4, 64, scales, biases, False),
             (one_hot, signed, 8, 32, three, None, True), (with_nan, codes, 4, 64, scales, biases, False)]
    ties = 0
    for rows, c, bits, group, sc, bi, is_signed in cases:
        for int8 in (False, True) if rows is not with_nan else (False,):
            got = kernels.grouped_matmul(rows, c, bits, group, sc, bi, signed=is_signed, variant=variant,
                                         int8_activations=int8, out_dtype=torch.bfloat16)
            full = kernels.grouped_matmul(rows, c, bits, group, sc, bi, signed=is_signed, variant=variant,
                                          int8_activations=int8)
            expected = full.bfloat16()
            assert got.dtype == torch.bfloat16 and torch.equal(got.isnan(), expected.isnan())
            assert torch.equal(got[~got.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))
            ties += int(((full.abs() > 256) & (full.abs() < 512) & (full % 2 == 1)).sum())
    assert ties > 0 and torch.isnan(full).any()


def test_threads_split_rows_and_give_the_same_bits():
    if kernels.chosen_variant() is None:
        pytest.skip("native kernels not built")
    generator = torch.Generator().manual_seed(2)
    codes, scales, biases = _affine(generator, 1000, 512, 4, 64, torch.bfloat16)
    x = torch.randn(3, 512, generator=generator)
    previous = torch.get_num_threads()
    for int8_activations in (False, True):
        outputs = []
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outputs.append(kernels.grouped_matmul(x, codes, 4, 64, scales, biases,
                                                      int8_activations=int8_activations))
        finally:
            torch.set_num_threads(previous)
        assert all(torch.equal(outputs[0], out) for out in outputs[1:])


def test_shapes_the_kernel_does_not_take_are_refused():
    if kernels.chosen_variant() is None:
        pytest.skip("native kernels not built")
    generator = torch.Generator().manual_seed(3)
    codes, scales, biases = _affine(generator, 16, 256, 4, 32, torch.bfloat16)
    assert kernels.fits(256, 32, torch.bfloat16) and not kernels.fits(256, 32, torch.float32)
    assert kernels.fits(96, 32, torch.bfloat16) and not kernels.fits(96, 64, torch.bfloat16)
    assert not kernels.fits(256 + 16, 16, torch.bfloat16) and not kernels.fits(256, 256, torch.bfloat16)
    with pytest.raises(ValueError, match="do not describe"):
        kernels.grouped_matmul(torch.randn(1, 256), codes, 4, 64, scales, biases)
    with pytest.raises(ValueError, match="do not describe"):
        kernels.grouped_matmul(torch.randn(1, 256), codes[:, ::2], 4, 32, scales, biases)


def _chosen(env: dict) -> str:
    code = "from engine import kernels; print(kernels.chosen_variant())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


def test_the_variant_follows_pytorchs_level_and_the_off_switch():
    assert _chosen({"MOSHI_NO_NATIVE_KERNELS": "1"}) == "None"
    if "avx2" in VARIANTS:  # an AVX-512 machine held to AVX2 runs the AVX2 build
        assert _chosen({"ATEN_CPU_CAPABILITY": "avx2"}) == "avx2"
    if VARIANTS:
        assert _chosen({"ATEN_CPU_CAPABILITY": "default"}) == "generic"
    for cap in VARIANTS:  # MOSHI_KERNEL_VARIANT holds the choice at or below a build
        assert _chosen({"MOSHI_KERNEL_VARIANT": cap}) == cap


def test_a_kernel_variant_that_names_no_build_is_an_error():
    code = "from engine import kernels; kernels.chosen_variant()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MOSHI_KERNEL_VARIANT": "avx9000"})
    assert out.returncode != 0 and "MOSHI_KERNEL_VARIANT='avx9000' names no build" in out.stderr
