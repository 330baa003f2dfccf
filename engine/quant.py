"""Quantized linears for the LM: int8 per output channel, int4 in groups along the input.

At batch 1 an LM step reads every weight once per token, so its time is the bytes read: int8
halves them against bf16 and int4 quarters them. Embeddings, norms, attention and the residual
stream stay in the model's dtype.

* ``Int8Linear`` holds the official q8 layout (the reference's q8 export): ``weight`` int8 and
  ``weight_scb`` fp32 [out], the absmax of each row, so that W ≈ weight · weight_scb / 127. The
  q8 files (``kyutai/moshi{ko,ka}-pytorch-q8``) load into it as they are, without bitsandbytes.
* ``BlockInt8Linear`` holds GGUF's Q8_0 (the candle ``model.q8.gguf`` files): int8 codes with
  one fp16 scale per block of 32 inputs, W = weight · scale of its block, exactly as stored.
* ``AffineLinear`` holds MLX's affine codes: 4- or 8-bit codes q with a scale and a bias per group
  of inputs, W = q · scale + bias (Kyutai's MLX q4/q8 files, and ``--quantize int4``, which
  quantizes a bf16 file to 4 bits at load time in the same layout; there is no int4 file format).

On CPU the products run on kernels that read the small weights directly: oneDNN's int8 matmul
for int8; for Q8_0 and the affine codes, our own kernels (``engine/kernels``), which multiply by
the stored codes and scales, or PyTorch's ``_weight_int4pack_mm_for_cpu`` (the one gpt-fast uses)
where those are not built. Elsewhere (CUDA) the weight is widened to the activations' dtype for
each product: always correct, and as fast as the device's plain matmul.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import CheckpointError
from .moshi.model import ZERO_TOKEN
from .transformer import Attention

MODES = ("int8", "int4")
# Group sizes of --quantize int4, largest first (PyTorch's CPU int4 kernel, the fallback, takes
# these and a multiple of 16 outputs; ours, these and any number of outputs).
INT4_GROUP_SIZES = (128, 64, 32)
# The q8 layout names the scale of a weight ``<weight key>_scb`` (bitsandbytes' "SCB").
SCALE_SUFFIX = "_scb"
# Linears the reference's q8 export replaces; embeddings, norms and MoshiVis's
# cross-attention stay in the model dtype.
_LAYER_LINEARS = (".self_attn.in_projs.", ".self_attn.out_projs.", ".gating.")
_HEAD_PREFIXES = ("text_linear", "depformer_in.", "linears.", "extra_heads.")


def check_mode(mode: str | None) -> None:
    """Refuse an unknown quantization (None: none) before any weight is read."""
    if mode is not None and mode not in MODES:
        raise CheckpointError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules a quantized LM replaces."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_layer = name.startswith(("transformer.layers.", "depformer.layers.")) and any(
            part in name for part in _LAYER_LINEARS)
        if in_layer or name.startswith(_HEAD_PREFIXES):
            names.append(name)
    return names


# Rows quantized at a time: the fp32 temporaries stay a few MB (cache-sized, and no 500 MB
# spike for a 32000-row vocabulary projection).
_ELEMENTS_PER_BLOCK = 1 << 20


def _row_blocks(weight: torch.Tensor):
    rows = max(1, _ELEMENTS_PER_BLOCK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start:start + rows].to(torch.float32, copy=True)  # worked on in place


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The q8 export's rule: CB = round(127 · W / absmax(row)) as int8, SCB = absmax(row) in fp32."""
    codes = torch.empty(weight.shape, dtype=torch.int8)
    absmax = torch.empty(weight.shape[0])
    for start, block in _row_blocks(weight):
        block_max = block.abs().amax(dim=1)
        block.mul_((127 / block_max.clamp(min=1e-12))[:, None]).round_()
        codes[start:start + len(block)] = block
        absmax[start:start + len(block)] = block_max
    return codes, absmax


def int4_group_size(in_features: int, out_features: int) -> int | None:
    """The largest group size that divides the input; None: the linear stays int8. A multiple of
    16 outputs keeps every int4 layer on PyTorch's int4 kernel where ours are not built."""
    if out_features % 16:
        return None
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


def int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of inputs in MLX's layout: ``(codes [N, K/2] uint8, two a
    byte, the even input in the low nibble; scales [N, K/g]; biases [N, K/g])``, fp32 scales and
    biases, W ≈ q · scale + bias with bias the group's minimum."""
    N, K = weight.shape
    codes = torch.empty(N, K // 2, dtype=torch.uint8)
    scales, biases = torch.empty(N, K // group_size), torch.empty(N, K // group_size)
    for start, block in _row_blocks(weight):
        rows = slice(start, start + len(block))
        groups = block.view(len(block), K // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-6)
        groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
        q = block.to(torch.uint8)
        codes[rows] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[rows], biases[rows] = scale, low
    return codes, scales, biases


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes [rows, in·bits/8] -> uint8 codes [rows, in]."""
    if bits == 8:
        return codes
    return torch.stack([codes & 15, codes >> 4], dim=-1).view(codes.shape[0], -1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weight [rows, in] of packed affine ``codes`` and their per-group ``scales`` and ``biases``."""
    values = unpack(codes, bits)
    rows, groups = scales.shape
    grouped = values.view(rows, groups, -1).float()
    return (grouped * scales.float()[..., None] + biases.float()[..., None]).view(rows, -1)


def _onednn_int8_matmul(codes: torch.Tensor, input_zero_point: int, packed: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``(codes − input_zero_point) · weightᵀ · scale`` for uint8 ``codes`` [rows, in]."""
    device = scale.device
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, torch.ones((), device=device), torch.full((), input_zero_point, dtype=torch.int32, device=device),
        packed, scale, torch.zeros(len(scale), dtype=torch.int32, device=device), None,
        1.0, 0, torch.float32, "none", [], "")


@functools.cache
def int8_saturates() -> bool:
    """Whether oneDNN's int8 matmul on this CPU sums pairs of unsigned × signed byte products in a
    saturating 16-bit integer (``vpmaddubsw``): its x86 kernels without VNNI do, and two products
    of 255 and 127 overflow it. Run on exactly that worst case, so that the answer follows the
    kernel oneDNN really dispatches here (``ONEDNN_MAX_CPU_ISA`` included), not a CPU flag."""
    inputs, outputs = 64, 16
    packed = torch.ops.onednn.qlinear_prepack(torch.full((outputs, inputs), 127, dtype=torch.int8), [1, inputs])
    codes = torch.full((1, inputs), 255, dtype=torch.uint8)
    got = _onednn_int8_matmul(codes, 128, packed, torch.ones(outputs))
    return not torch.equal(got, torch.full_like(got, 127 * 127 * inputs))


def int8_kernel() -> str:
    """Which int8 product runs on this CPU, for ``moshi doctor`` and the benchmarks."""
    if kernels.has_int8_path():
        return "native kernels' int8 path, activations in int8 a row at a time (--exact: weight-only int8)"
    if torch.backends.mkldnn.is_available() and not int8_saturates():
        return "oneDNN u8×s8 (VNNI), 8-bit activations"
    return "weight-only int8 (PyTorch's int8pack kernel), activations in the model dtype"


def grouped_kernel() -> str:
    """Which product Q8_0, --quantize int4 and MLX's codes run on this CPU, for ``moshi doctor`` and
    the benchmarks."""
    variant = kernels.chosen_variant()
    if variant is None:
        return "PyTorch's int4 kernel (native kernels not built or off)"
    if kernels.has_int8_path():
        return f"native kernels, {variant} build, activations in int8 blocks of 32 (unquantized with --exact)"
    return f"native kernels, {variant} build, activations unquantized"


class Int8Linear(nn.Module):
    """``y = x · (weight · weight_scb / 127)ᵀ`` with int8 weights; ``compute_dtype``: that of x.

    On a CPU the kernel is chosen by what the CPU does well (``prepare``, ``kernel``):

    * "native": where our kernels' int8 path is built (``kernels.has_int8_path``: AVX512-VNNI, or
      AVX2 without AVX-512) and the width is a multiple of 64, it multiplies the weight as
      stored, one fp32 scale a row, by the activations quantized a row at a time with one absmax
      scale d (the scheme of "onednn" below): a product's error is at most Σ|w|·d/2.
    * "onednn": other CPUs with VNNI, oneDNN's int8 matmul, which takes the weight in a layout of
      its own (the plain copy is dropped: the state dict then has no ``weight``). Each input row
      is quantized with one absmax scale, the scheme of the reference's q8 path (bitsandbytes'
      LLM.int8 with threshold 0): on Gaussian data a product's relative error is ~0.8%, against
      ~0.2% for the int8 weight alone.
    * "weight-only": other CPUs (AVX-512 without VNNI, or no build of ours), PyTorch's weight-only
      int8 kernel on activations in the model dtype. oneDNN's kernel there sums pairs of byte
      products in a saturating int16 (3.7% error on a 512×256 layer) and is 3-5x slower at one input row
      (2048×11264: 7.0 ms against 1.9 ms with PyTorch and oneDNN held to AVX2). ``--exact``
      (``exact_activations``) turns "native" layers to it.
    * "widen": other devices, and widths PyTorch's weight-only kernel does not take.
    """

    quantization = "int8"  # the name a session's info shows (``quantization_of``)

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scb = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.scale: torch.Tensor | None = None  # weight_scb / 127 [out, 1], set by prepare()
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout (CPU)
        self.kernel = "widen"  # set by prepare()

    def prepare(self, kernel: str | None = None) -> None:
        """Pick ``kernel`` (default: the fastest this device has, see the class); "onednn" drops
        the plain weight for oneDNN's packed copy."""
        self.scale = (self.weight_scb / 127)[:, None].contiguous()
        cpu = self.weight.device.type == "cpu"
        if kernel is None:
            kernel = ("widen" if not cpu else "native" if kernels.has_int8_path() and self.in_features % 64 == 0
                      else "onednn" if torch.backends.mkldnn.is_available() and not int8_saturates()
                      else self.exact_kernel())
        self.kernel = kernel
        if kernel == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(self.weight, [1, self.in_features])
            self.weight = None

    def exact_kernel(self) -> str:
        """The kernel that leaves the activations as they are: PyTorch's weight-only kernel on a
        CPU, where the width allows (PyTorch 2.13's AVX-512 int8pack kernel crashes on several input
        rows when the width is not a multiple of 16; every real model's is), else widening."""
        return "weight-only" if self.weight.device.type == "cpu" and self.in_features % 16 == 0 else "widen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return kernels.grouped_matmul(x, self.weight, 8, self.in_features, self.scale, None, signed=True,
                                          int8_activations=True, out_dtype=x.dtype)
        if self.kernel == "weight-only":
            flat = x.reshape(-1, self.in_features)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale.view(-1).to(x.dtype))
            return out.view(*x.shape[:-1], self.out_features)
        if self.kernel == "widen":
            return (F.linear(x, self.weight.to(x.dtype)) * self.scale.view(-1)).to(x.dtype)
        rows = x.reshape(-1, self.in_features).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127
        # The kernel multiplies unsigned by signed bytes: the input's signed codes are shifted
        # by 128, and oneDNN takes the shift back as a zero point.
        codes = torch.round(rows / row_scale).add_(128).to(torch.uint8)
        out = _onednn_int8_matmul(codes, 128, self.packed, self.scale.view(-1))
        return (out * row_scale).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {self.kernel}"


# Rows repacked for PyTorch's int4 kernel at a time (a multiple of its 64-row blocks): the int32
# codes its packing function takes stay a few MB instead of 0.5 GB for a vocabulary projection.
_PACK_ROWS = 1024


class AffineCodes(nn.Module):
    """A matrix of ``rows`` × ``inputs`` in MLX's affine codes, as the file holds it: ``weight`` (the
    packed codes' bytes, two 4-bit codes a byte with the even input in the low nibble, or one 8-bit
    code), ``scales`` and ``biases`` (one per group of ``group_size`` inputs, in ``compute_dtype``)."""

    def __init__(self, rows: int, inputs: int, bits: int, group_size: int, compute_dtype: torch.dtype):
        super().__init__()
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.weight = nn.Parameter(torch.empty(rows, inputs * bits // 8, dtype=torch.uint8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(rows, inputs // group_size, dtype=compute_dtype), requires_grad=False)
        self.biases = nn.Parameter(torch.empty(rows, inputs // group_size, dtype=compute_dtype), requires_grad=False)


class AffineLinear(AffineCodes):
    """``y = x · Wᵀ`` with W = q · scale + bias held as affine codes; computes in ``compute_dtype``.

    ``quantization``: what a session shows, "int4" for ``--quantize int4``, "mlx-q4"/"mlx-q8" for
    MLX's files. Three ways to multiply (``prepare`` picks one):

    * exact (fp32, or a device without a kernel): the weight is dequantized in fp32 for each
      product (exactly: ``scale · q`` needs at most 16 significant bits, so the one rounding is that
      of the sum, as in MLX's own dequantization), then widened to the activations' dtype.
    * native (a CPU in bf16/fp16, ``engine/kernels`` built): our kernel reads the codes, scales
      and biases as stored. Where our int8 path is built (``kernels.has_int8_path``: AVX512-VNNI,
      or AVX2 without AVX-512) it quantizes the activations in blocks of 32
      (``int8_activations``; error at most Σ|w|·scale/2, ~1e-3 of Σ|x·w|), else, or after
      ``exact_activations``, it gives the fp32 product with the dequantized weight up to the order
      of the fp32 sums.
    * PyTorch's int4 kernel (a CPU without ours): its convention is ``w = (c − 8) · scale + zero``,
      so a 4-bit code maps onto it with ``zero = bias + 8 · scale``, and an 8-bit code splits into
      its two nibbles, ``q = 16·hi + lo``, an int4 product twice as wide. It takes its scales and
      zeros in the activations' dtype: rounding ``zero`` to bf16 makes this path approximate.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 compute_dtype: torch.dtype, quantization: str | None = None):
        super().__init__(out_features, in_features, bits, group_size, compute_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.quantization = quantization or f"mlx-q{bits}"
        self.native = False  # set by prepare()
        self.int8_activations = False  # set by prepare(), cleared by exact_activations()
        # Once prepared for PyTorch's int4 kernel: its packed codes, and its scales and zeros [groups, out, 2]
        self.packed: nn.Parameter | None = None
        self.scales_zeros: nn.Parameter | None = None

    def prepare(self) -> None:
        """Pick the product for this device and dtype; fp32 stays on the exact path."""
        if self.weight.device.type != "cpu" or self.compute_dtype == torch.float32:
            return
        self.native = kernels.fits(self.in_features, self.group_size, self.scales.dtype)
        self.int8_activations = self.native and kernels.has_int8_path()
        if not self.native and self.group_size in INT4_GROUP_SIZES and self.out_features % 16 == 0:
            self._pack_for_torch()

    def _pack_for_torch(self) -> None:
        """Repack the codes for PyTorch's int4 kernel and drop the file's copy (its pages are released).

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
        if self.native:
            return kernels.grouped_matmul(x, self.weight, self.bits, self.group_size, self.scales, self.biases,
                                          int8_activations=self.int8_activations, out_dtype=x.dtype)
        if self.packed is None:
            return F.linear(x, dequantize(self.weight, self.scales, self.biases, self.bits).to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if self.bits == 8:
            flat = torch.cat([flat, flat], dim=1)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        path = "native kernel" if self.native else "int4 kernel" if self.packed is not None else "dequantized"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quantization}, "
                f"group_size={self.group_size}, {path}")


Q8_BLOCK = 32  # inputs per scale in GGUF's Q8_0


class BlockInt8Linear(nn.Module):
    """GGUF's Q8_0: ``weight`` int8 [out, in] and ``scales`` fp16 [out, in/32], W = weight · scale.

    Three ways to multiply, all with the file's own codes and scales (never quantized again):

    * exact (fp32 activations, or a device other than the CPU): each product widens the weight to
      the activations' dtype, block by block, then runs the plain matmul; in fp32 that weight is
      exactly the dequantized one, so the model computes what a float model of those weights does.
    * native (a CPU in bf16, ``engine/kernels`` built): our kernel reads the int8 codes and fp16
      scales as stored, 1.06 bytes per weight. Where our int8 path is built (AVX512-VNNI, or AVX2
      without AVX-512) it multiplies them by the activations in Q8_0 blocks of their own, as
      candle does (``int8_activations``), else, or after ``exact_activations``, it gives the fp32
      product with the dequantized weight up to the order of the fp32 sums.
    * PyTorch's int4 kernel (a CPU in bf16 without ours, ``prepare``): PyTorch's CPU kernels take int8 weights
      with one scale per row only, so each code q is split exactly into two 4-bit halves,
      q = 16·hi + lo, and both run through the int4 kernel that scales each group of 32 inputs:
      hi with scale 16·d, lo with scale d (and the kernel's offset of 8 codes put back as 8·d).
      The kernel takes its scales in the activations' dtype: in bf16 each block's d is rounded to
      8 bits (a relative change of at most 2⁻⁹), the one numeric difference from the exact path.
      It holds 1.25 bytes per weight (the codes, plus four bf16 numbers per 32 inputs).
    """

    quantization = "q8_0"  # the name a session's info shows (``quantization_of``)

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, in_features // Q8_BLOCK, dtype=torch.float16),
                                   requires_grad=False)
        self.native = False  # set by prepare()
        self.int8_activations = False  # set by prepare(), cleared by exact_activations()
        # Set by prepare() for PyTorch's int4 kernel: both halves in its layout, [out, in], and its
        # scales and offsets, [2·in/32, out, 2].
        self.packed: nn.Parameter | None = None
        self.scales_zeros: nn.Parameter | None = None

    @staticmethod
    def kernel(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> str | None:
        """The product a layer of this shape gets: "native", "int4" (PyTorch's int4 kernel, which
        takes a multiple of 16 outputs) or None (exact)."""
        if device.type != "cpu" or dtype != torch.bfloat16:
            return None
        if kernels.fits(in_features, Q8_BLOCK, torch.float16):
            return "native"
        return "int4" if out_features % 16 == 0 else None

    def prepare(self) -> None:
        """Pick the product; for PyTorch's int4 kernel the weight is repacked and the int8 copy dropped.
        The native kernel takes ``weight`` as [out, in], contiguous."""
        kernel = self.kernel(self.in_features, self.out_features, self.weight.device, self.compute_dtype)
        self.native = kernel == "native"
        self.int8_activations = self.native and kernels.has_int8_path()
        if kernel != "int4":
            return
        packed = torch.empty(self.out_features, self.in_features, dtype=torch.uint8)
        # A few times 64 rows at a time: the kernel packs rows in blocks of 64, and the int32 codes
        # of a whole layer would be four times its size (those of a vocabulary projection, gigabytes).
        rows = 64 * max(1, (1 << 18) // (64 * self.in_features))
        for start in range(0, self.out_features, rows):
            # ``weight`` may be [out, in] or, read where it lies in a GGUF file, [out, in/32, 32].
            codes = self.weight[start:start + rows].reshape(-1, self.in_features)
            halves = torch.cat([(codes >> 4) + 8, codes & 15], dim=1)  # still in int8: 0..15 each
            packed[start:start + rows] = torch._convert_weight_to_int4pack_for_cpu(halves.to(torch.int32), 1)
        self.packed = nn.Parameter(packed, requires_grad=False)
        d = self.scales.float().t()  # [in/32, out]
        high = torch.stack([16 * d, torch.zeros_like(d)], dim=-1)
        low = torch.stack([d, 8 * d], dim=-1)
        self.scales_zeros = nn.Parameter(torch.cat([high, low]).to(self.compute_dtype), requires_grad=False)
        self.weight = self.scales = None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight, W = code · scale in fp32 (exact), then in ``dtype``."""
        blocks = self.weight.view(self.out_features, -1, Q8_BLOCK).float() * self.scales.float()[..., None]
        return blocks.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return kernels.grouped_matmul(x, self.weight, 8, Q8_BLOCK, self.scales, None, signed=True,
                                          int8_activations=self.int8_activations, out_dtype=x.dtype)
        if self.packed is None:
            return F.linear(x, self.dequantized(x.dtype))
        flat = x.reshape(-1, self.in_features)
        # [x, x] against [hi | lo]: one product sums both halves in the kernel's fp32 accumulator.
        out = torch._weight_int4pack_mm_for_cpu(torch.cat([flat, flat], dim=1), self.packed, Q8_BLOCK,
                                                self.scales_zeros.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q8_0"


class BlockInt8Embedding(nn.Module):
    """A Q8_0 embedding table (``weight`` int8, ``scales`` fp16 per 32 values): the rows a step looks
    up are dequantized, exactly, in fp32, then cast to ``compute_dtype``; the table stays 1.06 bytes
    per value. The token ZERO_TOKEN embeds to zeros, as ``TokenEmbedding`` does."""

    def __init__(self, num_embeddings: int, embedding_dim: int, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(num_embeddings, embedding_dim // Q8_BLOCK, dtype=torch.float16),
                                   requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        index = tokens.clamp(min=0)
        rows = self.weight[index].view(*index.shape, -1, Q8_BLOCK).float() * self.scales[index].float()[..., None]
        y = rows.flatten(-2).to(self.compute_dtype)
        return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=y.dtype, device=y.device), y)


def quantization_of(model: nn.Module) -> str | None:
    """How a model's linears are quantized, from their ``quantization``: "int4" (with int8 where the
    int4 kernel cannot go), "int8", "q8_0", "mlx-q4", ..., or None for a float model."""
    kinds = {module.quantization for module in model.modules() if hasattr(module, "quantization")}
    if "int4" in kinds:
        return "int4"
    return ", ".join(sorted(kinds)) or None


def has_int8_weights(state: dict[str, torch.Tensor]) -> bool:
    """A q8 checkpoint: its linears come as int8 ``weight`` with an fp32 ``weight_scb``."""
    return any(key.endswith(SCALE_SUFFIX) for key in state)


def _release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the pages of a tensor that is read for the last time.

    A memory-mapped checkpoint's pages stay resident (and in the RSS) while the mapping lives,
    which is as long as any tensor of the file (embeddings, norms) is in use.
    """
    if tensor.device.type == "cpu":
        release_pages(tensor.data_ptr(), tensor.nbytes)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc): loading leaves layer-sized holes
    between the weights it keeps, which would otherwise stay in the RSS."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except AttributeError:  # not glibc (musl)
            pass


def release_pages(address: int, nbytes: int) -> None:
    """``madvise(DONTNEED)`` the pages wholly inside ``[address, address + nbytes)``; for a file
    mapping they would be read back from the file if used again."""
    if sys.platform != "linux":
        return
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def quantize_state(state: dict[str, torch.Tensor], names: list[str], mode: str) -> dict[str, torch.Tensor]:
    """Replace the float weights of the linears ``names`` by their quantized tensors, one at a time.

    Tensors are read straight from the memory-mapped file, and their pages released once read:
    only one layer's float copy exists at a time, so quantizing a 15 GB bf16 model needs about
    the quantized model's memory. ``state`` must own its float tensors (a file's, not a model's).
    With int4, a linear whose shape the kernel cannot take is quantized to int8.
    """
    state = dict(state)
    for name in names:
        key = f"{name}.weight"
        weight = state.pop(key)
        group_size = int4_group_size(weight.shape[1], weight.shape[0]) if mode == "int4" else None
        if group_size is None:
            state[key], state[key + SCALE_SUFFIX] = int8_rows(weight)
        else:
            state[key], state[f"{name}.scales"], state[f"{name}.biases"] = int4_groups(weight, group_size)
        _release_pages(weight)
    return state


def replace_linears(model: nn.Module, names: list[str], mode: str, compute_dtype: torch.dtype) -> None:
    """Swap the named nn.Linear modules for empty quantized ones (build on the meta device), with
    the same choice per shape as ``quantize_state``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = parent.get_submodule(child)
        group_size = int4_group_size(linear.in_features, linear.out_features) if mode == "int4" else None
        if group_size is None:
            new = Int8Linear(linear.in_features, linear.out_features, compute_dtype)
        else:
            new = AffineLinear(linear.in_features, linear.out_features, 4, group_size, compute_dtype, "int4")
        setattr(parent, child, new)


def exact_activations(model: nn.Module) -> None:
    """``--exact``: the native kernels of every grouped linear (int4, Q8_0, MLX) multiply the
    activations as they are, the fp32 product with the dequantized weight, instead of quantizing
    them in blocks of 32; int8 layers on the native kernel move to the weight-only one."""
    for module in model.modules():
        if isinstance(module, (AffineLinear, BlockInt8Linear)):
            module.int8_activations = False
        elif isinstance(module, Int8Linear) and module.kernel == "native":
            module.kernel = module.exact_kernel()


def finish_quantized(model: nn.Module, device: torch.device) -> None:
    """After the weights are assigned: derive kernel scales, and pick the attention kernel."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, AffineLinear)):
            module.prepare()
        elif isinstance(module, Attention) and device.type == "cpu":
            # The plain model keeps the fused kernel for bit-parity with the reference; a quantized
            # one need not, and takes the faster paths (``Attention.fast_attention``).
            module.fast_attention = True
