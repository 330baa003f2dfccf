"""Loading Mimi from a checkpoint in the official layout (fused attention names accepted)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..formats.transformers import is_transformers_mimi, mimi_state
from ..weights import load_weights, read_safetensors
from .model import Mimi, MimiConfig

if TYPE_CHECKING:
    from ..hub import CheckpointInfo


def load_mimi(path: str | Path, config: MimiConfig | None = None, num_codebooks: int = 8,
              device: torch.device | str = "cpu", exact_codes: bool = True) -> Mimi:
    """A Mimi with the file's tensors, in fp32, for inference only; ``config`` None: the released codec."""
    with torch.device("meta"):
        mimi = Mimi(config or MimiConfig.official(), exact_codes)
    # transformers' MimiModel names (kyutai/mimi, or inside a transformers Moshi or STT file)
    state = mimi_state(path, mimi) if is_transformers_mimi(path) else read_safetensors(path)
    load_weights(mimi, state, str(path), dtype=torch.float32, device=device)
    mimi.quantizer.refresh()
    mimi.requires_grad_(False)
    mimi.eval()
    mimi.set_num_codebooks(num_codebooks)
    return mimi


def checkpoint_mimi_config(info: CheckpointInfo) -> MimiConfig | None:
    """The checkpoint's own Mimi config (``mimi_config_name``), or None for the released codec."""
    return MimiConfig.from_dict(info.mimi_config) if info.mimi_config else None


def exact_codes_on(device: torch.device, exact: bool) -> bool:
    """Whether Mimi encodes with the reference's kernels: when asked (``--exact``), and off a CPU,
    where the faster kernels were neither needed nor measured."""
    return exact or device.type != "cpu"


def load_checkpoint_mimi(info: CheckpointInfo, num_codebooks: int, device: torch.device, exact: bool = False) -> Mimi:
    """The Mimi a resolved checkpoint names, in this process; ``exact``: the ``--exact`` flag."""
    return load_mimi(info.mimi_weights, checkpoint_mimi_config(info), num_codebooks=num_codebooks, device=device,
                     exact_codes=exact_codes_on(torch.device(device), exact))
