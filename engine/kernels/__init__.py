"""Native CPU kernels, bound with ctypes: the grouped low-bit linears (``grouped.c``) and the
attention of a decoding step (``attend.c``, see ``attend``).

``grouped.c`` multiplies a few rows of activations by a weight kept as stored: 4-bit codes (two a
byte, the even input in the low nibble) or 8-bit codes, signed or not, with a bf16 or fp16 scale
(and optionally a bias) per group of inputs. Its exact paths turn each code exactly into its
dequantized weight in registers (or, on the AVX512-BF16 path, into its exact bf16 value, scaled per
group): the result is the fp32 product with the dequantized weight, up to fp32 rounding in another
order. Its int8 path (AVX512-VNNI, or AVX2 without AVX-512; asked for with ``int8_activations``)
quantizes the activations in blocks of 32 (a row at a time for weights with one scale a row) and
multiplies bytes by bytes, about twice as fast from the caches at one row, within a stated bound.

setup.py builds the sources once per instruction set (``VARIANTS``, best first); a build that
failed (no compiler, another architecture) is simply absent, and the linears then use PyTorch's
kernels. The variant is chosen at run time from what both the CPU and PyTorch's dispatch level
(``ATEN_CPU_CAPABILITY``) allow; ``MOSHI_KERNEL_VARIANT=avx2`` (a variant's name; another value is
an error) caps the choice at that build, ``MOSHI_NO_NATIVE_KERNELS=1`` turns them all off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch

from ..errors import EngineError

# variant -> the CPU flags (as /proc/cpuinfo names them) its build was compiled for, best first
VARIANTS = {
    "avx512bf16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "generic": (),
}
# torch.backends.cpu.get_cpu_capability() values under which each variant may run
_CAPABILITIES = {"avx512bf16": {"AVX512"}, "avx512": {"AVX512"}, "avx2": {"AVX2", "AVX512"}}
MAX_ROWS = 8  # rows of activations per pass over the weight (more take several passes)
_SCALE_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # as grouped.c numbers them


def _library_path(variant: str) -> Path | None:
    folder = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_grouped_{variant}{suffix}"
        if path.exists():
            return path
    return None


@functools.cache
def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo does not say (then PyTorch's level decides)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), None)
    return set(line.split(":", 1)[1].split()) if line else None


def runnable_variants() -> list[str]:
    """The built variants this CPU can run, best first (PyTorch's dispatch level aside)."""
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    found = []
    for variant, needs in VARIANTS.items():
        if _library_path(variant) is None:
            continue
        cpu_has = all(flag in flags for flag in needs) if flags is not None else (
            not needs or capability in _CAPABILITIES[variant])
        if cpu_has:
            found.append(variant)
    return found


@functools.cache
def chosen_variant() -> str | None:
    """The variant the linears use: the best one the CPU runs and PyTorch's level allows, or None."""
    if os.environ.get("MOSHI_NO_NATIVE_KERNELS", "") not in ("", "0"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    allowed = [v for v in runnable_variants() if v == "generic" or capability in _CAPABILITIES[v]]
    # MOSHI_KERNEL_VARIANT caps the choice at a lower build: what a machine with less runs (tests)
    cap = os.environ.get("MOSHI_KERNEL_VARIANT", "")
    if cap and cap not in VARIANTS:
        raise EngineError(f"MOSHI_KERNEL_VARIANT={cap!r} names no build of the kernels: one of {', '.join(VARIANTS)}")
    if cap:
        allowed = [v for v in allowed if list(VARIANTS).index(v) >= list(VARIANTS).index(cap)]
    return next(iter(allowed), None)


@contextlib.contextmanager
def disabled():
    """Within it, layers prepared choose no native kernel: what an install without them runs."""
    previous = os.environ.get("MOSHI_NO_NATIVE_KERNELS")
    os.environ["MOSHI_NO_NATIVE_KERNELS"] = "1"
    chosen_variant.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MOSHI_NO_NATIVE_KERNELS"]
        else:
            os.environ["MOSHI_NO_NATIVE_KERNELS"] = previous
        chosen_variant.cache_clear()


@functools.cache
def library(variant: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library_path(variant)))
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.moshi_grouped_matmul.argtypes = [p, i32, i64, i64, i64, p, i32, i32, i64, p, i32, p, p, i32, i32, i32]
    lib.moshi_grouped_matmul.restype = i32
    lib.moshi_k_multiple.restype = i32
    lib.moshi_int8_path.restype = i32
    lib.moshi_read_bytes.argtypes = [p, i64]
    lib.moshi_read_bytes.restype = i64
    lib.moshi_attend.argtypes = [p, p, p, i32, i64, i64, i64, i64, i64, p, ctypes.c_float, p, i32]
    lib.moshi_attend.restype = i32
    return lib


def read_bytes(data: torch.Tensor) -> None:
    """Read every byte of ``data`` (contiguous, a multiple of 64 bytes) once, as the kernels read
    their weights (prefetching ahead): how the benchmarks measure what one thread reads from memory."""
    variant = chosen_variant()
    if variant is None or not data.is_contiguous() or data.nbytes % 64:
        raise ValueError("read_bytes: no native kernels, or not a contiguous multiple of 64 bytes")
    library(variant).moshi_read_bytes(data.data_ptr(), data.nbytes)


def has_int8_path(variant: str | None = None) -> bool:
    """Whether a build (default: the chosen one) multiplies int8 activations: the AVX512-VNNI build
    (``vpdpbusd``) and the AVX2 one (``vpmaddubsw``), not AVX-512 without VNNI nor the generic one."""
    variant = variant or chosen_variant()
    return variant is not None and bool(library(variant).moshi_int8_path())


def fits(in_features: int, group_size: int, scales_dtype: torch.dtype) -> bool:
    """Whether the chosen variant takes a weight of this width, group size and scale dtype."""
    variant = chosen_variant()
    if variant is None or scales_dtype not in (torch.bfloat16, torch.float16):
        return False
    multiple = library(variant).moshi_k_multiple()
    return in_features % multiple == 0 and in_features % group_size == 0 and group_size in (32, 64, 128)


def attends(head_dim: int, variant: str | None = None) -> bool:
    """Whether ``attend`` takes heads of this size, on the chosen build (or ``variant``): a multiple
    of 16 values (every build's vector width divides it) up to 256."""
    variant = variant or chosen_variant()
    return variant is not None and head_dim % 16 == 0 and head_dim <= 256


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
           variant: str | None = None) -> torch.Tensor:
    """One query a head against the first ``n`` slots of a ring: q [B, H, 1, D]; keys and values
    [B, H, capacity, D] (bf16 or fp32, contiguous); ``allowed`` [B, n] bool, the slots each batch
    row attends. Returns softmax(q·kᵀ/√D) · v [B, H, 1, D] in fp32, computed in fp32 in one pass
    over the ring (``attend.c``). Heads of a size ``attends`` takes."""
    variant = variant or chosen_variant()
    B, H, _, D = q.shape
    capacity, n = keys.shape[2], allowed.shape[1]
    if (q.shape[2] != 1 or keys.shape != (B, H, capacity, D) or values.shape != keys.shape
            or values.dtype != keys.dtype or keys.dtype not in (torch.bfloat16, torch.float32)
            or not keys.is_contiguous() or not values.is_contiguous() or allowed.shape != (B, n) or n > capacity):
        raise ValueError(f"attend: q {tuple(q.shape)}, keys {tuple(keys.shape)} {keys.dtype}, values "
                         f"{tuple(values.shape)} {values.dtype}, allowed {tuple(allowed.shape)} do not fit")
    q32 = q.reshape(B * H, D).to(torch.float32).contiguous()
    flags = (allowed if allowed.dtype == torch.bool else allowed.to(torch.bool)).contiguous()  # a byte each, 0 or 1
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    status = library(variant).moshi_attend(
        q32.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), B, H, capacity, n, D,
        flags.data_ptr(), D ** -0.5, out.data_ptr(), torch.get_num_threads())
    if status:
        raise ValueError(f"attend ({variant}): heads of {D} are not a size this kernel takes" if status == -1
                         else "out of memory")
    return out


def grouped_matmul(x: torch.Tensor, codes: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor,
                   biases: torch.Tensor | None, signed: bool = False, variant: str | None = None,
                   int8_activations: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x · Wᵀ`` for ``x`` [..., K] and W [N, K] = codes · scales (+ biases) per group of inputs.
    With bf16 ``x`` and 4-bit codes in groups of 32, a build with AVX512-BF16 multiplies exact bf16
    products (the same result up to the order of the sums); other activations are widened to fp32.

    ``codes``: uint8 [N, K·bits/8] (4-bit: the even input in the low nibble) or, ``signed``, int8
    [N, K] (any shape of N·K values, row-major); ``scales`` and ``biases``: bf16, fp16 or fp32
    [N, K/group]. Groups of 32, 64 or 128 inputs; with ``int8_activations`` on a build that has the
    int8 path, signed codes also take one scale a row (``group_size`` = K, a multiple of 64).
    ``variant``: a build other than the chosen one (the tests run each). ``out_dtype``: the result's;
    the kernel writes bf16 itself, rounded from its fp32 sums as ``.to(torch.bfloat16)`` rounds them
    (one op less a call; other dtypes are converted from fp32).
    ``int8_activations``: on a build with the int8 path (``has_int8_path``), quantize x in blocks of 32
    inputs (scale max|x|/127, as GGUF's Q8_0) and multiply bytes by bytes: the one error is x's
    rounding, |y − exact| ≤ Σ_k |w_k| · scale_k / 2; elsewhere it changes nothing."""
    variant = variant or chosen_variant()
    K = x.shape[-1]
    N = scales.shape[0]
    # bf16 activations go as they are (the 4-bit codes have a bf16 path); anything else in fp32
    rows = x.reshape(-1, K)
    rows = (rows if rows.dtype == torch.bfloat16 else rows.to(torch.float32)).contiguous()
    if (codes.numel() * 8 != N * K * bits or scales.shape != (N, K // group_size) or not codes.is_contiguous()
            or not scales.is_contiguous() or scales.dtype not in _SCALE_KINDS
            or (biases is not None and (biases.shape != scales.shape or biases.dtype != scales.dtype
                                        or not biases.is_contiguous()))):
        raise ValueError(f"grouped_matmul: codes {tuple(codes.shape)}, scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not describe a [{N}, {K}] weight in groups of {group_size}")
    written = out_dtype if out_dtype == torch.bfloat16 else torch.float32
    y = torch.empty(rows.shape[0], N, dtype=written)
    status = library(variant).moshi_grouped_matmul(
        rows.data_ptr(), int(rows.dtype == torch.bfloat16), rows.shape[0], K, N, codes.data_ptr(), bits, int(signed), group_size, scales.data_ptr(),
        _SCALE_KINDS[scales.dtype], biases.data_ptr() if biases is not None else None, y.data_ptr(),
        int(written == torch.bfloat16), torch.get_num_threads(), int(int8_activations))
    if status:
        raise ValueError(f"grouped_matmul ({variant}): a [{N}, {K}] weight of {bits}-bit codes in groups of "
                         f"{group_size} is not a shape this kernel takes" if status == -1 else "out of memory")
    return y.view(*x.shape[:-1], N).to(out_dtype)
