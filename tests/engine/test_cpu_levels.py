"""The CPU-dependent kernels hold their promises at every x86 feature level, whatever this machine
is: the quantization and attention tests run again with oneDNN (and, for AVX2, PyTorch's own
kernels) held to a lower instruction set. The machines that build and test the project differ
(AVX2 only; AVX-512 with and without VNNI; AMX), and int8 once lost its accuracy on those without
VNNI while passing everywhere else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    # a cap: lower machines keep theirs; our kernels held to the build without VNNI
    "avx512-without-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MOSHI_KERNEL_VARIANT": "avx512"},
}
TESTS = ["tests/engine/test_quant.py", "tests/engine/test_transformer.py",
         "tests/engine/test_moshivis.py::test_quantized_moshivis_within_tolerance_of_bf16"]
LEVEL_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MOSHI_KERNEL_VARIANT")


def test_holding_to_avx2_really_changes_the_int8_kernels():
    """Held to AVX2, our kernels take their AVX2 build (its own int8 path) and oneDNN's int8 kernel
    saturates, so that --exact and installs without our kernels take the weight-only kernel
    (without this the runs below would test the same kernels again)."""
    code = "from engine import kernels, quant; print(kernels.chosen_variant(), quant.int8_saturates())"
    env = {k: v for k, v in os.environ.items() if k not in LEVEL_VARIABLES}
    held = subprocess.run([sys.executable, "-c", code], env={**env, **LEVELS["avx2"]}, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=True).stdout
    assert held.split() == ["avx2", "True"]


@pytest.mark.skipif(any(os.environ.get(k) for k in LEVEL_VARIABLES), reason="already a held run")
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_quantization_and_attention_at_a_lower_level(level):
    env = {**os.environ, **LEVELS[level]}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", "not cli"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
