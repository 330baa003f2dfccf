"""Loading the Moshi LM (Moshi and STT checkpoints): the official file layout (bf16 or q8) here, the
other formats through ``engine.formats``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import formats, quant
from ..errors import CheckpointError
from ..weights import load_weights, read_safetensors, split_fused_attention
from .model import LMConfig, LMModel

if TYPE_CHECKING:
    from ..hub import CheckpointInfo


def derive_ffn_hidden(cfg: LMConfig, state: dict[str, torch.Tensor]) -> LMConfig:
    """Take the gated FFN widths from the weights: the reference derives them from hidden_scale
    (``2 · dim_feedforward // 3``, or ``21 · dim // 8`` when dim_feedforward = 4 · dim), and a
    config.json's hidden_scale does not always give, through that rule, the width its weights have."""
    updates = {}
    temporal = state.get("transformer.layers.0.gating.linear_in.weight")
    if temporal is not None:
        updates["ffn_hidden"] = temporal.shape[0] // 2
    depth = state.get("depformer.layers.0.gating.0.linear_in.weight")
    if depth is not None:
        updates["depformer_ffn_hidden"] = depth.shape[0] // 2
    return replace(cfg, **updates)


def load_lm(weights: str | Path, cfg: LMConfig, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> LMModel:
    """The LM of a checkpoint file in any layout we read (see ``engine.formats``), of architecture ``cfg``.

    A q8 file (int8 weights with fp32 ``weight_scb``) loads as it is stored. ``quantize`` ("int8"
    or "int4") quantizes a float file's linears while loading; ``dtype`` is then the dtype of
    everything else (embeddings, norms, activations).
    """
    fmt = formats.detect(Path(weights))
    if fmt is not None:
        return fmt.load_lm(Path(weights), cfg.to_dict(), torch.device(device), dtype, quantize)
    state = read_safetensors(weights)
    formats.check_official_layout(state.keys(), Path(weights))
    return load_lm_state(state, str(weights), cfg, device, dtype, quantize)


def load_lm_state(state: dict[str, torch.Tensor], source: str, cfg: LMConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> LMModel:
    """``load_lm`` on tensors in the official layout (those of a file, which they may still map, or
    built in memory); ``source`` names them in errors. Build on the meta device and assign the
    tensors: no random init, no double copy.
    """
    quant.check_mode(quantize)
    device = torch.device(device)
    cfg = derive_ffn_hidden(cfg, state)
    with torch.device("meta"):
        model = LMModel(cfg)
    stored_int8 = quant.has_int8_weights(state)
    if stored_int8 and quantize == "int4":
        raise CheckpointError(f"{source} is already quantized to int8; --quantize int4 needs a bf16 checkpoint")
    mode = "int8" if stored_int8 else quantize
    if mode is not None:
        names = quant.quantized_linear_names(model)
        state = split_fused_attention(model, state)
        if not stored_int8:
            state = quant.quantize_state(state, names, mode)
        quant.replace_linears(model, names, mode, dtype)
    # The reference assigns the memory-mapped tensors as they lie in the file: keeping them in
    # place gives its kernels' alignment, and no second copy of gigabytes of weights.
    load_weights(model, state, source, dtype=dtype, device=device, copy_unaligned=False)
    del state  # the model holds what it needs: each plain int8 copy can go once packed
    if mode is not None:
        quant.finish_quantized(model, device)
    return model.eval()


def load_checkpoint_lm(info: CheckpointInfo, device: torch.device, dtype: torch.dtype,
                       quantize: str | None = None) -> LMModel:
    """The LM a resolved checkpoint names, with the architecture of its config.json; a checkpoint
    in another format without one (candle, MLX) has the sizes its tensors' shapes give."""
    quant.check_mode(quantize)
    path = Path(info.lm_weights)
    fmt = formats.detect(path)
    if fmt is not None:
        lm_config = info.lm_config if info.raw_config is not None else None
        return fmt.load_lm(path, lm_config, torch.device(device), dtype, quantize)
    return load_lm(path, LMConfig.from_dict(info.lm_config), device=device, dtype=dtype, quantize=quantize)
