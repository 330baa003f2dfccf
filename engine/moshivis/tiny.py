"""Tiny random MoshiVis checkpoints, for ``moshi tiny-model --kind see`` and the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..moshi.model import LMConfig
from ..moshi.tiny import random_lm_state, write_tiny_moshi_checkpoint
from ..weights import read_safetensors
from .loading import to_official_layout
from .model import MoshiVisConfig
from .vision import ImagePrefix, VisionConfig


def write_tiny_moshivis_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """The tiny chat checkpoint of the same seed (same tokenizer, Mimi and transformer weights) turned
    into a MoshiVis one: random gates, shared cross-attention and vision side, saved in the official
    layout.

    Where MoshiVis's RMSNorms would not tell their two forms apart on plain random weights, the
    weights are shaped like trained ones: each embedding table has an offset row added to all its
    rows, and the image projection has a bias far from zero, so that the activations are not
    centred (on centred activations the variance and mean(x²) forms give the same tokens). The
    gates are scaled to open to about 0.1, as trained ones do, so that the picture changes the
    tokens within a few steps.

    The vision tower is stored in fp32 and everything else in bf16, so loading sees mixed dtypes.
    """
    folder = write_tiny_moshi_checkpoint(folder, seed)
    config = json.loads((folder / "config.json").read_text())
    cfg = MoshiVisConfig(lm=LMConfig.from_dict(config), vision=VisionConfig.tiny())
    plain = read_safetensors(folder / "model.safetensors")
    adapters = {k: v for k, v in random_lm_state(cfg.model_lm(), seed + 1).items() if k not in plain}
    state = {f"lm.{k}": v for k, v in _like_trained({**plain, **adapters}, seed).items()}
    for name, tensor in random_image_prefix_state(cfg.vision, cfg.lm.dim, seed).items():
        state[f"image_prefix.{name}"] = tensor if name.startswith("tower.") else tensor.to(torch.bfloat16)
    # The plain weights are memory-mapped from the file being replaced: write aside, then swap.
    partial = folder / "model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in to_official_layout(state).items()}, partial)
    os.replace(partial, folder / "model.safetensors")
    config.update(model_type="moshivis", moshivis=cfg.section())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _like_trained(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 LM weights with offset embedding rows and wider-open gates (see above)."""
    generator = torch.Generator().manual_seed(seed + 2)
    out = {}
    for name, tensor in state.items():
        if name.split(".")[0] in ("text_emb", "emb", "depformer_text_emb", "depformer_emb"):
            # One offset per table, of the rows' own scale, whose mean over channels is 0.3 of that.
            width = tensor.shape[1]
            tensor = tensor.float() + (0.3 + torch.randn(width, generator=generator)) / width**0.5
        elif name.endswith("cross_attention.gate.alpha.2.weight"):
            tensor = 4 * tensor.float()
        out[name] = tensor.to(torch.bfloat16)
    return out


def random_image_prefix_state(cfg: VisionConfig, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for an ImagePrefix (``tower.*``, ``proj_xa.*``, ``norm_xa.alpha``),
    scaled so that activations stay O(1) through the layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in ImagePrefix(cfg, dim).state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("alpha") or ("norm" in name and name.endswith("weight")):
            value = 1.0 + 0.1 * noise
        elif "norm" in name:
            value = 0.1 * noise
        elif name == "proj_xa.bias":  # far from zero, as trained: see write_tiny_moshivis_checkpoint
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif "position_embedding" in name:
            value = 0.5 * noise
        else:
            value = noise / tensor[0].numel() ** 0.5
        state[name] = value
    return state
