"""Tiny candle checkpoints written as Kyutai's export does, with the format's own software.

The Rust layout comes from the official one by the table of Kyutai's ``import_rust.py`` (written
here independently of ``engine.formats.candle``, which maps the other way); the q8 file is a GGUF
written by llama.cpp's ``gguf`` package, every 2-D tensor with a multiple of 32 inputs quantized
to Q8_0 by the package's own quantizer and everything else F32, the rule of candle's
``tensor-tools quantize``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import save_file

from engine.moshi.model import LMConfig
from engine.moshi.tiny import random_lm_state

# Heads of the Moshi 7B's sizes (128 and 64 wide), so that a folder without config.json loads; the
# depth transformer's gated width (176) is not a multiple of 32, so one linear per slice stays F32.
TINY_CANDLE = replace(LMConfig.tiny_moshi(), dim=256, num_heads=2, ffn_hidden=672, depformer_dim=64,
                      depformer_num_heads=1, depformer_ffn_hidden=176, card=64)


def rust_layout(state: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Official (fused attention names) -> Rust layout: the depth transformer cut into slices."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "depformer_in":
            out[f"depformer.{parts[1]}.linear_in.weight"] = tensor
        elif parts[0] == "linears":
            out[f"depformer.{parts[1]}.linear_out.weight"] = tensor
        elif parts[0] == "depformer_text_emb":
            out["depformer.0.emb.weight"] = tensor
        elif parts[0] == "depformer_emb":
            out[f"depformer.{int(parts[1]) + 1}.emb.weight"] = tensor
        elif parts[0] == "depformer":  # depformer.layers.L.<rest>
            layer, rest = parts[2], ".".join(parts[3:])
            for step in range(cfg.dep_q):
                prefix = f"depformer.{step}.transformer.layers.{layer}"
                if rest.startswith("self_attn."):
                    out[f"{prefix}.{rest}"] = tensor.chunk(cfg.dep_q)[step].clone()
                elif rest.startswith("gating."):
                    if int(parts[4]) == step:
                        out[f"{prefix}.gating.{'.'.join(parts[5:])}"] = tensor
                else:  # norms: a copy in every slice
                    out[f"{prefix}.{rest}"] = tensor.clone()
        else:
            out[key] = tensor
    return out


def q8_0(array: np.ndarray) -> bool:
    """tensor-tools' rule: rank 2 with a multiple of 32 inputs is Q8_0, the rest F32."""
    return array.ndim == 2 and array.shape[1] % 32 == 0


def write_q8_gguf(path: Path, rust: dict[str, torch.Tensor]) -> Path:
    writer = GGUFWriter(str(path), arch="moshi")
    for name, tensor in rust.items():
        array = tensor.float().numpy()
        if q8_0(array):
            writer.add_tensor(name, quants.quantize(array, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official-layout fp32 weights a q8 GGUF of ``state`` holds, dequantized by the gguf
    package (Q8_0 blocks lie along the input dim, so quantizing the fused attention weights is
    quantizing each slice)."""
    out = {}
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if q8_0(array):
            array = quants.dequantize(quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        out[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return out


def write_candle_files(folder: Path, cfg: LMConfig = TINY_CANDLE, seed: int = 1) -> dict[str, Path]:
    """{"official": bf16 official layout, "bf16": Rust-layout safetensors, "q8": Rust-layout GGUF,
    "dequantized": the q8 file's weights in fp32, official layout}."""
    folder.mkdir(parents=True, exist_ok=True)
    state = random_lm_state(cfg, seed=seed)
    rust = rust_layout(state, cfg)
    paths = {name: folder / file for name, file in (("official", "official.safetensors"),
                                                     ("bf16", "model.safetensors"), ("q8", "model.q8.gguf"),
                                                     ("dequantized", "dequantized.safetensors"))}
    save_file(state, paths["official"])
    save_file(rust, paths["bf16"])
    write_q8_gguf(paths["q8"], rust)
    save_file(dequantized_official(state), paths["dequantized"])
    return paths
