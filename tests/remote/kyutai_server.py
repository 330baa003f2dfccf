"""Kyutai's `python -m moshi.server` (the reference package) on a CPU: its warm-up ends with
`torch.cuda.synchronize()`, which a torch without CUDA refuses, so that one call is made a no-op.
Everything else is the reference server as published, with its own arguments; the module runs its
`main()` when it is imported."""

import torch

torch.cuda.synchronize = lambda *args, **kwargs: None

import moshi.server  # noqa: E402,F401 - serves until it is stopped
