"""Streaming state shared by every model in the engine.

A streaming module keeps whatever it must remember between calls (conv tails, KV caches,
step offsets) in a state dataclass. The state exists only inside ``with model.streaming(B):``,
is created for the whole module tree at once, and can be reset per batch slot, so a new
conversation starts without reloading any weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class StreamingState:
    batch_size: int
    device: torch.device

    def reset(self, mask: torch.Tensor | None) -> None:
        """Forget the past of the batch slots where ``mask`` is True (all slots when None)."""


class StreamingModule(nn.Module):
    """A module whose state lives in ``self.state`` while streaming; subclasses implement ``init_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.state: StreamingState | None = None

    def init_state(self, batch_size: int) -> StreamingState:
        return StreamingState(batch_size, _device_of(self))

    def _streaming_tree(self) -> list[StreamingModule]:
        found: list[StreamingModule] = []

        def visit(module: nn.Module) -> None:
            if isinstance(module, StreamingModule):
                found.append(module)
            for child in module.children():
                visit(child)

        visit(self)
        return found

    @property
    def is_streaming(self) -> bool:
        return self.state is not None

    def start_streaming(self, batch_size: int) -> None:
        for module in self._streaming_tree():
            if module.state is not None:
                raise RuntimeError(f"{type(module).__name__} is already streaming")
            module.state = module.init_state(batch_size)

    def stop_streaming(self) -> None:
        for module in self._streaming_tree():
            module.state = None

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        self.start_streaming(batch_size)
        try:
            yield
        finally:
            self.stop_streaming()

    def reset_streaming(self, mask: torch.Tensor | None = None) -> None:
        """Start over for the slots in ``mask`` (all slots when None), keeping the weights."""
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__} is not streaming")
        if mask is not None:
            mask = mask.to(self.state.device)
        for module in self._streaming_tree():
            assert module.state is not None
            module.state.reset(mask)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
