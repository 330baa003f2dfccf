"""The streaming transformer used by Mimi, the Moshi temporal LM and the depth transformer.

One layer class covers the three variants, selected by ``TransformerConfig``:

* Mimi: LayerNorm, LayerScale, GELU MLP, RoPE, a ring KV cache of 250 steps.
* Moshi/STT temporal: fp32 RMSNorm (eps 1e-8), SiLU-gated FFN, RoPE, ring KV cache of ``context``.
* Depth transformer: as temporal, but no positional encoding and separate attention/FFN weights
  for each codebook step ("weights per step"), its cache holding one frame.

Numerics deliberately follow the reference operation by operation (interleaved RoPE in fp32,
the KV ring with capacity == context, the residual written as ``x.to(update) + update``) so that
the same weights give the same codes and tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import StreamingModule, StreamingState


@dataclass
class TransformerConfig:
    dim: int
    num_heads: int
    num_layers: int
    ffn_hidden: int  # MLP width, or the gated hidden size (half of ``linear_in``'s rows)
    context: int | None  # attention span and KV ring capacity, in steps
    norm: str = "rms_norm_f32"  # "rms_norm_f32" | "layer_norm"
    ffn: str = "silu_gated"  # "silu_gated" | "gelu"
    max_period: float | None = 10_000.0  # RoPE period; None disables positional encoding
    layer_scale: bool = False
    weights_per_step: int = 0  # >0: the depth transformer's per-codebook weights

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def apply_rope(q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, max_period: float):
    """Rotate interleaved pairs (x[2j], x[2j+1]) of q and k, shaped [B, H, T, D], in fp32."""
    B, H, T, D = q.shape
    ds = torch.arange(D // 2, device=q.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    ts = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32)
    ts = ts.view(B, 1, -1, 1)
    rotr = torch.cos(freqs * ts)
    roti = torch.sin(freqs * ts)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], D // 2, 2)
        xr, xi = x[..., 0].float(), x[..., 1].float()
        out_r = xr * rotr - xi * roti
        out_i = xr * roti + xi * rotr
        return torch.stack([out_r.to(q.dtype), out_i.to(q.dtype)], dim=-1).view(*x.shape[:-2], D)

    return rotate(q), rotate(k)


class RMSNorm(nn.Module):
    """``x * alpha * rsqrt(eps + mean(x²))`` computed in fp32, whatever the weights' dtype."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        var = self.eps + torch.mean(x32**2, dim=2, keepdim=True)
        return (x32 * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rms_norm_f32":
        return RMSNorm(dim)
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    raise ValueError(f"unknown norm {kind!r}")


class GatedFFN(nn.Module):
    """SiLU gating: rows [0:hidden] of ``linear_in`` are the gate, [hidden:2·hidden] the value."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        return self.linear_out(F.silu(h[..., 0, :]) * h[..., 1, :])


@dataclass
class KVCacheState(StreamingState):
    """A ring of ``capacity`` steps per batch slot, plus where each slot is in time.

    ``offset`` counts every step a slot has seen (it drives RoPE and never wraps); ``end`` is
    the number of steps written to the ring since the last reset. Both are reset together.
    """

    cache: torch.Tensor  # [2, B, H, capacity, head_dim]
    offset: torch.Tensor  # [B] long
    step: int = 0  # host-side count of calls since the last full reset, for per-step weights

    @property
    def capacity(self) -> int:
        return self.cache.shape[3]

    def reset(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self.offset.zero_()
            self.step = 0
        else:
            self.offset[:] = torch.where(mask, torch.zeros_like(self.offset), self.offset)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Write T new steps and return the whole ring with each slot's absolute position (-1: empty)."""
        B, H, T, D = k.shape
        capacity = self.capacity
        written = self.offset.view(-1, 1) + torch.arange(T, device=k.device)
        index = (written % capacity).view(B, 1, T, 1).expand(-1, H, T, D)
        self.cache[0].scatter_(2, index, k)
        self.cache[1].scatter_(2, index, v)

        slots = torch.arange(capacity, device=k.device)
        last = self.offset.view(-1, 1) + T - 1
        delta = slots - last % capacity
        positions = torch.where(delta <= 0, last + delta, last + delta - capacity)
        positions = torch.where(slots >= self.offset.view(-1, 1) + T, -1, positions)
        return self.cache[0], self.cache[1], positions


class Attention(StreamingModule):
    """Causal self-attention with a fused QKV projection, optional RoPE and a ring KV cache.

    With ``weights_per_step = n`` there are n projections and call number ``i`` of a streaming
    session uses the i-th: that is how the depth transformer gives each codebook its own weights.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        steps = max(cfg.weights_per_step, 1)
        self.in_projs = nn.ModuleList(nn.Linear(cfg.dim, 3 * cfg.dim, bias=False) for _ in range(steps))
        self.out_projs = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(steps))

    def init_state(self, batch_size: int) -> KVCacheState:
        weight = self.in_projs[0].weight
        capacity = self.cfg.context or self.cfg.weights_per_step
        if not capacity:
            raise RuntimeError("a streaming attention needs a context or weights per step")
        dtype = torch.float16 if weight.dtype == torch.int8 else weight.dtype
        shape = (2, batch_size, self.cfg.num_heads, capacity, self.cfg.head_dim)
        return KVCacheState(
            batch_size,
            weight.device,
            cache=torch.zeros(shape, device=weight.device, dtype=dtype),
            offset=torch.zeros(batch_size, device=weight.device, dtype=torch.long),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        state = self.state
        step = state.step if state is not None else 0
        if cfg.weights_per_step and T != 1:
            raise ValueError("per-step weights take one step per call")
        in_proj, out_proj = self.in_projs[step % len(self.in_projs)], self.out_projs[step % len(self.out_projs)]

        qkv = in_proj(x).view(B, T, 3, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if state is None:
            offset = torch.zeros(B, device=x.device, dtype=torch.long)
        else:
            offset = state.offset
        if cfg.max_period is not None:
            q, k = apply_rope(q, k, offset, cfg.max_period)

        if state is None:
            keys, values = k, v
            pos_k = torch.arange(T, device=x.device).expand(B, -1)
        else:
            keys, values, pos_k = state.append(k, v)
        pos_q = offset.view(-1, 1, 1) + torch.arange(T, device=x.device).view(-1, 1)
        delta = pos_q - pos_k[:, None]
        mask = (pos_k[:, None] >= 0) & (delta >= 0)
        if cfg.context is not None:
            mask = mask & (delta < cfg.context)
        out = F.scaled_dot_product_attention(q, keys, values, mask[:, None], dropout_p=0.0)
        out = out.transpose(1, 2).reshape(B, T, cfg.dim)
        out = out_proj(out)

        if state is not None:
            state.offset += T
            state.step += T
        return out


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = Attention(cfg)
        self.norm1 = make_norm(cfg.norm, cfg.dim)
        self.norm2 = make_norm(cfg.norm, cfg.dim)
        if cfg.ffn == "gelu":
            self.linear1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
            self.linear2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        elif cfg.weights_per_step:
            self.gating = nn.ModuleList(GatedFFN(cfg.dim, cfg.ffn_hidden) for _ in range(cfg.weights_per_step))
        else:
            self.gating = GatedFFN(cfg.dim, cfg.ffn_hidden)
        if cfg.layer_scale:
            self.layer_scale_1 = LayerScale(cfg.dim)
            self.layer_scale_2 = LayerScale(cfg.dim)

    def _scale(self, which: int, update: torch.Tensor) -> torch.Tensor:
        if not self.cfg.layer_scale:
            return update
        return (self.layer_scale_1 if which == 1 else self.layer_scale_2)(update)

    def feed_forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.cfg.ffn == "gelu":
            return self.linear2(F.gelu(self.linear1(x)))
        if self.cfg.weights_per_step:
            return self.gating[step](x)
        return self.gating(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.self_attn.state
        step = state.step if state is not None else 0
        update = self.self_attn(self.norm1(x))
        x = x.to(update) + self._scale(1, update)
        update = self.feed_forward(self.norm2(x), step)
        return x.to(update) + self._scale(2, update)


class Transformer(StreamingModule):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        for layer in self.layers:
            x = layer(x)
        return x.to(dtype)
