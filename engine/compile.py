"""GPU step acceleration: the LM's per-step functions compiled or captured in a CUDA graph.

One Moshi step launches thousands of small kernels (the depth transformer alone runs 8 codebooks
× 6 layers), so on a GPU the launch overhead, not the arithmetic, sets the frame time. Each step
function is run in the first of these modes that works:

1. ``compile``: ``torch.compile(mode="reduce-overhead")`` (fused kernels replayed as CUDA graphs);
2. ``cuda-graph``: the eager function captured once in a ``torch.cuda.CUDAGraph`` and replayed;
3. ``eager``: plain PyTorch.

``MOSHI_NO_COMPILE=1`` removes the first, ``MOSHI_NO_CUDA_GRAPH=1`` the second (and makes compile
use no graphs). A mode that fails on its first use is dropped with a warning on stderr and the
call is run by the next one. On CPU only ``eager`` exists: nothing here touches the CPU path.

Contract for a wrapped function: tensor arguments only; its outputs may be overwritten by the
next call (graphs replay into the same memory), so callers use them before stepping again; and
it is safe to run again after a failed first use (host-side state reset at entry or unused).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .env import env_flag

logger = logging.getLogger(__name__)

MODES = ("compile", "cuda-graph", "eager")
# Eager calls before capturing a graph: the first allocates cuBLAS workspaces and caches.
_EAGER_CALLS_BEFORE_CAPTURE = 2


def step_modes(device: torch.device) -> list[str]:
    """The modes to try on this device, best first, after the escape hatches."""
    if device.type != "cuda":
        return ["eager"]
    modes = []
    if not env_flag("MOSHI_NO_COMPILE"):
        modes.append("compile")
    if not env_flag("MOSHI_NO_CUDA_GRAPH"):
        modes.append("cuda-graph")
    return modes + ["eager"]


class _CudaGraph:
    """Runs eagerly a few times, then captures one call and replays it with the inputs copied in."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs = None

    def __call__(self, *args: torch.Tensor):
        if self.graph is None:
            self.calls += 1
            if self.calls <= _EAGER_CALLS_BEFORE_CAPTURE:
                return self.fn(*args)
            self.inputs = [arg.clone() for arg in args]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = self.fn(*self.inputs)
            self.graph = graph
        for static, arg in zip(self.inputs, args):
            static.copy_(arg)
        self.graph.replay()
        return self.outputs


class AcceleratedStep:
    """``fn`` behind the first working mode of ``modes``; ``mode`` says which one runs it."""

    def __init__(self, fn: Callable, name: str, modes: list[str]):
        self.fn, self.name = fn, name
        self.modes = list(modes)
        self.fallbacks: list[str] = []  # "mode: reason" for each mode given up, for display
        self._runner: Callable | None = None
        self._proven = False  # the current mode has completed a call

    @property
    def mode(self) -> str:
        return self.modes[0]

    def reset(self) -> None:
        """Forget compiled code and graphs: the tensors they hold (streaming state) were replaced."""
        self._runner, self._proven = None, False

    def __call__(self, *args: torch.Tensor):
        while True:
            if self._runner is None:
                self._runner = self._build(self.mode)
            if self._proven or self.mode == "eager":
                return self._runner(*args)
            try:
                out = self._runner(*args)
            except Exception as exc:  # any failure of compile or capture: fall back, visibly
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                logger.warning("moshi: %s: %s failed (%s); falling back to %s", self.name, self.mode, reason,
                               self.modes[1])
                self.fallbacks.append(f"{self.mode}: {reason}")
                self.modes.pop(0)
                self._runner = None
                continue
            self._proven = not isinstance(self._runner, _CudaGraph) or self._runner.graph is not None
            return out

    def _build(self, mode: str) -> Callable:
        if mode == "compile":
            graphs = "cuda-graph" in self.modes
            return torch.compile(self.fn, mode="reduce-overhead" if graphs else "default", fullgraph=True)
        if mode == "cuda-graph":
            return _CudaGraph(self.fn)
        return self.fn
