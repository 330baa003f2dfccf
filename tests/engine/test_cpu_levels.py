"""The CPU-dependent kernels hold their promises at every x86 feature level, whatever this machine
is: the quantization and attention tests run again with oneDNN (and, for AVX2, PyTorch's own
kernels) held to a lower instruction set, and once more without our native kernels (an install
without a compiler), so that PyTorch's and oneDNN's int8 kernels are tested too. The machines that
build and test the project differ (AVX2 only; AVX-512 with and without VNNI; AMX), and int8 once
lost its accuracy on those without VNNI while passing everywhere else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import kernels

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512-without-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MOSHI_NO_NATIVE_KERNELS": "1"},  # a cap
    "avx2-without-native-kernels": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                    "MOSHI_NO_NATIVE_KERNELS": "1"},
}
TESTS = ["tests/engine/test_quant.py", "tests/engine/test_transformer.py",
         "tests/engine/test_moshivis.py::test_quantized_moshivis_within_tolerance_of_bf16"]
LEVEL_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MOSHI_NO_NATIVE_KERNELS")


def _int8_kernel(level: str) -> str:
    code = "from engine.quant import int8_kernel; print(int8_kernel())"
    env = {k: v for k, v in os.environ.items() if k not in LEVEL_VARIABLES}
    return subprocess.run([sys.executable, "-c", code], env={**env, **LEVELS[level]}, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=True).stdout


def test_each_level_really_changes_the_int8_kernel():
    """Held to AVX2, our kernels run their AVX2 build; without them, oneDNN's int8 kernel held to
    AVX2 saturates and PyTorch's weight-only kernel takes over, and held to AVX-512 without VNNI
    likewise (without this the runs below would test the same kernels again)."""
    if "avx2" in kernels.runnable_variants():
        assert _int8_kernel("avx2").startswith("native kernels, avx2 build")
    assert _int8_kernel("avx2-without-native-kernels").startswith("weight-only int8")
    assert _int8_kernel("avx512-without-vnni").startswith("weight-only int8")



@pytest.mark.skipif(any(os.environ.get(k) for k in LEVEL_VARIABLES), reason="already a held run")
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_quantization_and_attention_at_a_lower_level(level):
    env = {**os.environ, **LEVELS[level]}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", "not cli"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
