"""Test-wide settings: one torch thread (these machines have 2 shared cores) and the reference
implementation run without torch.compile or CUDA graphs."""

import os

import pytest

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

try:
    import torch
except ImportError:  # the CLI-only tests do not need it
    pass
else:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def vis_folders(tmp_path_factory):
    """A tiny MoshiVis checkpoint and a tiny chat checkpoint of the same seed, for the tests that
    load pictures and tell the two kinds apart."""
    from engine.moshivis.tiny import write_tiny_moshivis_checkpoint
    from engine.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("vis")
    return {"vis": write_tiny_moshivis_checkpoint(root / "vis", seed=3),
            "chat": write_tiny_checkpoint(root / "chat", "chat", seed=3)}
