"""Loading tensors in the official checkpoint layout into our modules, strictly.

Every key of the model must be present with the right shape and nothing may be left over;
otherwise the error names the offending keys. The official bf16 files store each attention's
projections fused (``self_attn.in_proj_weight``, and for the depth transformer all codebook steps
stacked on dim 0); the q8 files and our modules use one projection per step (``in_projs.{i}``).
Both layouts are accepted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .quant import SCALE_SUFFIX
from .transformer import Attention

_FUSED_NAMES = {"in_proj_weight": "in_projs", "in_proj.weight": "in_projs", "out_proj.weight": "out_projs"}
_SHOWN = 8
# CPU kernels (oneDNN convs, MKL GEMMs) may take another code path, and round differently, for
# data that is not aligned to a cache line. Tensors memory-mapped from a safetensors file sit at
# whatever offset the file gives them, so those that are not aligned get their own copy.
_ALIGNMENT = 64


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Open a safetensors file memory-mapped (weights are paged in as they are used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({exc})") from None


def split_fused_attention(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite fused attention weights ``[steps·rows, cols]`` into one tensor per step."""
    state = dict(state)
    for prefix, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        steps = len(module.in_projs)
        for fused, split in _FUSED_NAMES.items():
            for suffix in ("", SCALE_SUFFIX):
                key = f"{prefix}.{fused}{suffix}"
                if key not in state:
                    continue
                tensor = state.pop(key)
                if tensor.shape[0] % steps:
                    raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} cannot be split into {steps} steps")
                parts = tensor.view(steps, -1, *tensor.shape[1:])
                for i in range(steps):
                    state[f"{prefix}.{split}.{i}.weight{suffix}"] = parts[i]
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped tensors."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{name} {tuple(state[name].shape)} (expected {expected[name]})"
        for name in set(expected) & set(state)
        if tuple(state[name].shape) != expected[name]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape for {len(misshaped)} tensor(s): {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    copy_unaligned: bool = True,
) -> None:
    """Check and assign ``state`` to ``model`` (which may live on the meta device).

    Floating tensors are cast to ``dtype`` when given, except int8 scales (``*_scb``), which stay
    fp32 as the quantized matmul needs them. ``copy_unaligned=False`` keeps memory-mapped tensors
    where they are, whatever their alignment.
    """
    state = split_fused_attention(model, state)
    check_state(model, state, source)
    for key, tensor in state.items():
        if dtype is not None and tensor.is_floating_point() and not key.endswith(SCALE_SUFFIX):
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        if copy_unaligned and tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
            tensor = tensor.clone()
        state[key] = tensor
    model.load_state_dict(state, strict=True, assign=True)
