"""Fixtures shared by the engine tests."""

import pytest
from safetensors.torch import save_file

from engine.moshi.model import LMConfig
from engine.moshi.tiny import random_lm_state


@pytest.fixture(scope="session")
def lm_checkpoints(tmp_path_factory):
    """Random tiny Moshi and STT LMs in the official file layout: {"moshi": path, "stt": path}."""
    folder = tmp_path_factory.mktemp("lm")
    paths = {}
    for name, cfg in {"moshi": LMConfig.tiny_moshi(), "stt": LMConfig.tiny_stt()}.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(random_lm_state(cfg, seed=1), paths[name])
    return paths


@pytest.fixture
def without_native_kernels():
    """The quantized linears as an install without the native kernels runs them (PyTorch's kernels)."""
    from engine import kernels

    with kernels.disabled():
        yield
