"""Random Mimi weights: what a tiny checkpoint (``moshi tiny-model``) and the benchmarks load."""

from __future__ import annotations

import torch
from torch import nn

from ..quantizer import Codebook
from ..transformer import Attention, LayerScale
from .model import Mimi, MimiConfig


def random_mimi_state(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official file layout, for tiny checkpoints and benchmarks without the real file.

    Scales keep activations near unit size through every layer, and the codebooks are drawn at
    the scale of the latent they quantise, so the codes spread over many codewords (default
    codebooks are all zero and would give only code 0).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    with torch.device("meta"):
        mimi = Mimi(config)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in mimi.named_modules():
        tensors: dict[str, torch.Tensor] = {}
        if isinstance(module, nn.Conv1d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0]
            tensors["weight"] = normal(module.weight.shape, fan_in**-0.5)
        elif isinstance(module, nn.ConvTranspose1d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] // module.stride[0]
            tensors["weight"] = normal(module.weight.shape, fan_in**-0.5)
        elif isinstance(module, nn.Linear):
            tensors["weight"] = normal(module.weight.shape, module.in_features**-0.5)
        elif isinstance(module, nn.LayerNorm):
            tensors["weight"] = normal(module.weight.shape, 0.1, mean=1.0)
            tensors["bias"] = normal(module.bias.shape, 0.1)
        elif isinstance(module, LayerScale):
            tensors["scale"] = torch.rand(module.scale.shape, generator=generator) * 0.2
        elif isinstance(module, Codebook):
            bins, dim = module.embedding_sum.shape
            usage = torch.rand(bins, generator=generator) * 2 + 0.5
            tensors["embedding_sum"] = normal((bins, dim), 0.3) * usage[:, None]
            tensors["cluster_usage"] = usage
            tensors["_initialized"] = torch.ones(1)
        if getattr(module, "bias", None) is not None and "bias" not in tensors and not isinstance(module, LayerScale):
            tensors["bias"] = normal(module.bias.shape, 0.05)
        for name, tensor in tensors.items():
            state[f"{prefix}.{name}"] = tensor
    for prefix, module in mimi.named_modules():
        if isinstance(module, Attention):
            # The released file stores the attention projections under the fused names.
            state[f"{prefix}.in_proj_weight"] = state.pop(f"{prefix}.in_projs.0.weight")
            state[f"{prefix}.out_proj.weight"] = state.pop(f"{prefix}.out_projs.0.weight")
    return state
