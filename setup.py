"""The native CPU kernels (engine/kernels/grouped.c and attend.c), built once per instruction set.

Everything else about the package is in pyproject.toml. Each build is optional: without a
compiler, or on another architecture, the install still succeeds and the linears use PyTorch's
kernels (engine/kernels/__init__.py picks the best build the CPU runs).
"""

from setuptools import Extension, setup

SOURCES = ["engine/kernels/grouped.c", "engine/kernels/attend.c"]
# variant -> compiler flags; the names match engine/kernels VARIANTS
FLAGS = {
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
}

setup(ext_modules=[
    Extension(f"engine.kernels._grouped_{variant}", SOURCES, depends=["engine/kernels/vector.h"], optional=True,
              # GNU C contracts a * b + c into one FMA (ISO C mode would not)
              extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=fast", "-fopenmp", *flags],
              extra_link_args=["-fopenmp"])
    for variant, flags in FLAGS.items()
])
