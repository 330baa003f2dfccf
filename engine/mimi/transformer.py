"""Mimi's transformers, run on the shared ``Transformer``'s parameters and KV rings with less overhead.

Mimi calls each of its two 8-layer transformers on 2 steps per frame, where PyTorch's cost per
operation rivals the arithmetic. This step computes once per call what every layer shares (RoPE
angles, ring slots, attention mask) instead of once per layer, and calls the layers' parameters
directly. The modules, key names and streaming states stay those of ``engine/transformer.py``.

With ``exact=True`` every operation is one that ``engine/transformer.py`` performs (itself operation for
operation the reference's), on the same shapes and layouts, so the output is the same bits and
the codes stay identical. ``exact=False`` (decoding, or encoding with ``exact_codes=False``)
computes the linears in the layout this CPU reads weights fastest (``conv.few_rows_linear``), and
with ``half`` (decoding unless ``--exact``) from bfloat16 weights where the CPU gains by it.
Mimi runs in fp32, so the reference's casts to fp32 and back around RoPE are no-ops and are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..conv import Bf16Weight, bf16_weight, few_rows_linear
from ..transformer import KVCacheState, Transformer, TransformerConfig, TransformerLayer, rope_angles


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of ``x [..., T, D]`` (q and k stacked) as ``apply_rope`` does, without
    its casts (Mimi runs in fp32)."""
    pairs = x.view(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).view(x.shape)


class MimiTransformer(nn.Module):
    """The transformer on SEANet's ``[B, C, T]`` layout (the reference's ``conv_layout``)."""

    def __init__(self, cfg: TransformerConfig, exact: bool = True, half: bool = False):
        super().__init__()
        self.transformer = Transformer(cfg)
        self.linear = F.linear if exact else self._fast_linear
        self.half = half  # bfloat16 weights where the CPU gains by it (``conv.bf16_pays``)
        self.packed: dict[tuple, Bf16Weight] = {}

    def _fast_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        half = bf16_weight(self, weight)
        return half(x) if half is not None else few_rows_linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.transformer.cfg
        layers = list(self.transformer.layers)
        caches = [layer.self_attn.state for layer in layers]
        B, _, T = x.shape
        steps = torch.arange(T, device=x.device)
        # Every layer has seen the same steps: the first one's ring stands for all.
        ring = caches[0]
        offset = ring.offset if ring is not None else torch.zeros(B, device=x.device, dtype=torch.long)
        angles = rope_angles(offset, T, cfg.head_dim, cfg.max_period)
        if ring is None:
            slots = None
            pos_k = steps.expand(B, -1)
        else:
            written = offset.view(-1, 1) + steps
            slots = (written % ring.capacity).view(B, 1, T, 1).expand(-1, cfg.num_heads, T, cfg.head_dim)
            pos_k = self._ring_positions(offset, T, ring.capacity)
        # As in Attention.forward: a key is visible once written, if not in the query's future
        # and less than ``context`` steps behind it.
        pos_q = offset.view(-1, 1, 1) + steps.view(-1, 1)
        delta = pos_q - pos_k[:, None]
        mask = (pos_k[:, None] >= 0) & (delta >= 0)
        if cfg.context is not None:
            mask = mask & (delta < cfg.context)
        mask = mask[:, None]

        x = x.transpose(1, 2)
        for layer, cache in zip(layers, caches):
            x = self._layer(layer, x, angles, cache, slots, mask)
        if ring is not None:
            for cache in caches:
                cache.offset += T
                cache.step += T
        return x.transpose(1, 2)

    @staticmethod
    def _ring_positions(offset: torch.Tensor, steps: int, capacity: int) -> torch.Tensor:
        """Absolute step held by each ring slot once ``steps`` more are written (-1: never written)."""
        slots = torch.arange(capacity, device=offset.device)
        last = offset.view(-1, 1) + steps - 1
        delta = slots - last % capacity
        positions = torch.where(delta <= 0, last + delta, last + delta - capacity)
        return torch.where(slots >= offset.view(-1, 1) + steps, -1, positions)

    def _layer(self, layer: TransformerLayer, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor],
               cache: KVCacheState | None, slots: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.transformer.cfg
        linear = self.linear
        B, T, C = x.shape
        attn = layer.self_attn
        h = F.layer_norm(x, (C,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        qkv = linear(h, attn.in_projs[0].weight).view(B, T, 3, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        qk = _rotate(qkv[:2], *angles)
        q, k, v = qk[0], qk[1], qkv[2]
        if cache is None:
            keys, values = k, v
        else:
            cache.cache[0].scatter_(2, slots, k)
            cache.cache[1].scatter_(2, slots, v)
            keys, values = cache.cache[0], cache.cache[1]
        out = F.scaled_dot_product_attention(q, keys, values, mask, dropout_p=0.0)
        update = linear(out.transpose(1, 2).reshape(B, T, C), attn.out_projs[0].weight)
        x = x + (layer.layer_scale_1.scale * update if cfg.layer_scale else update)
        h = F.layer_norm(x, (C,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        update = linear(F.gelu(linear(h, layer.linear1.weight)), layer.linear2.weight)
        return x + (layer.layer_scale_2.scale * update if cfg.layer_scale else update)
