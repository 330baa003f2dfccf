"""Test-wide settings: one torch thread (these machines have 2 shared cores) and the reference
implementation run without torch.compile or CUDA graphs."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

try:
    import torch
except ImportError:  # the CLI-only tests do not need it
    pass
else:
    torch.set_num_threads(1)
