"""Kyutai's `python -m moshi.server` (the reference package) on a CPU: its warm-up ends with
`torch.cuda.synchronize()`, which a torch without CUDA refuses, so that one call is made a no-op.
Everything else is the reference server as published; the arguments are its own."""

import torch

torch.cuda.synchronize = lambda *args, **kwargs: None

from moshi import server  # noqa: E402 - after the patch, which its module-level code does not need but its main does

if __name__ == "__main__":
    server.main()
