"""The streaming transformer used by Mimi, the Moshi temporal LM and the depth transformer.

One layer class covers the three variants, selected by ``TransformerConfig``:

* Mimi: LayerNorm, LayerScale, GELU MLP, RoPE, a ring KV cache of 250 steps.
* Moshi/STT temporal: fp32 RMSNorm (eps 1e-8), SiLU-gated FFN, RoPE, ring KV cache of ``context``.
* Depth transformer: as temporal, but no positional encoding and separate attention/FFN weights
  for each codebook step ("weights per step"), its cache holding one frame.
* MoshiVis temporal: as Moshi temporal, plus a gated cross-attention to image tokens between
  self-attention and the FFN of every layer (``cross_attention``). One attention module is shared
  by all layers; each layer has its own pre-norm and gate.

Numerics deliberately follow the reference operation by operation (interleaved RoPE in fp32,
the KV ring with capacity == context, the residual written as ``x.to(update) + update``) so that
the same weights give the same codes and tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .streaming import StreamingModule, StreamingState


@dataclass
class TransformerConfig:
    dim: int
    num_heads: int
    num_layers: int
    ffn_hidden: int  # MLP width, or the gated hidden size (half of ``linear_in``'s rows)
    context: int | None  # attention span and KV ring capacity, in steps
    norm: str = "rms_norm_f32"  # "rms_norm_f32" | "rms_norm_f32_variance" | "layer_norm"
    ffn: str = "silu_gated"  # "silu_gated" | "gelu"
    max_period: float | None = 10_000.0  # RoPE period; None disables positional encoding
    layer_scale: bool = False
    weights_per_step: int = 0  # >0: the depth transformer's per-codebook weights
    cross_attention: bool = False  # MoshiVis: gated cross-attention to image tokens in every layer

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def rope_angles(offset: torch.Tensor, steps: int, head_dim: int,
                max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, head_dim / 2] of RoPE's angles for ``steps`` steps from each row's
    ``offset`` [B]: the same for every layer, so a transformer computes them once a call."""
    ds = torch.arange(head_dim // 2, device=offset.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    ts = offset.float().view(-1, 1) + torch.arange(steps, device=offset.device, dtype=torch.float32)
    ts = ts.view(offset.shape[0], 1, -1, 1)
    return torch.cos(freqs * ts), torch.sin(freqs * ts)


def apply_rope(qk: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of q and k stacked, [2, B, H, T, D], in fp32,
    and give them back in their dtype (both at once: half the operations of one at a time)."""
    rotr, roti = angles
    pairs = qk.view(*qk.shape[:-1], -1, 2)
    xr, xi = pairs[..., 0].float(), pairs[..., 1].float()
    out_r = xr * rotr - xi * roti
    out_i = xr * roti + xi * rotr
    return torch.stack([out_r.to(qk.dtype), out_i.to(qk.dtype)], dim=-1).view(qk.shape)


def matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention as two batched matmuls in the cache's dtype, the softmax in fp32.

    In bf16 on CPUs without AMX this is ~8x faster than ``scaled_dot_product_attention`` for one
    query over a long ring, but it rounds differently, so only quantized models use it. Every
    query sees at least its own key, so no row is fully masked.
    """
    dtype, q = q.dtype, q.to(keys.dtype)
    if keys.dtype == torch.bfloat16:
        # The same dot products as q · keysᵀ, but oneDNN's bf16 kernel runs 2-5x faster with the
        # keys as the rows it walks: 32 heads of 128 over 1000 keys, 1.1 ms against 5.3 ms (the
        # other way is a strided walk it handles slowly; fp32 is faster as q · keysᵀ).
        scores = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2).float()
    else:
        scores = torch.matmul(q, keys.transpose(-1, -2)).float()
    scores = scores * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values).to(dtype)


class RMSNorm(nn.Module):
    """``x * alpha * rsqrt(eps + mean(x²))`` computed in fp32, whatever the weights' dtype.

    With ``variance``, the unbiased variance of x replaces mean(x²) (x itself is not centred):
    the form Kyutai's PyTorch MoshiVis code uses in its depth transformer and after the image
    projection.
    """

    def __init__(self, dim: int, eps: float = 1e-8, variance: bool = False):
        super().__init__()
        self.eps = eps
        self.variance = variance
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.variance:
            var = self.eps + x32.var(dim=2, keepdim=True)
        else:
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
    if kind == "rms_norm_f32_variance":
        return RMSNorm(dim, variance=True)
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
    step: int = 0  # host-side count of steps since the last full reset (per-step weights; on CPU, the slots written)

    @property
    def capacity(self) -> int:
        return self.cache.shape[3]

    def reset(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self.offset.zero_()
            self.step = 0
        else:
            self.offset[:] = torch.where(mask, torch.zeros_like(self.offset), self.offset)

    def append(self, k: torch.Tensor, v: torch.Tensor, first: int | None = None):
        """Write T new steps and return the whole ring with the absolute position of each of its
        ``first`` slots (None: all; -1: empty). A ``first`` given says the host knows the shapes
        (CPU): one step is then copied to its slot in place, without index tensors."""
        B, H, T, D = k.shape
        capacity = self.capacity
        if first is not None and T == 1:
            self.write_step(k, v)
        else:
            self._scatter(k, v)
        slots = torch.arange(capacity if first is None else first, device=k.device)
        last = self.offset.view(-1, 1) + T - 1
        delta = slots - last % capacity
        positions = torch.where(delta <= 0, last + delta, last + delta - capacity)
        positions = torch.where(slots >= self.offset.view(-1, 1) + T, -1, positions)
        return self.cache[0], self.cache[1], positions

    def write_step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy one step of k and v [B, H, 1, D] to each batch row's slot, in place (host-side slots)."""
        for b, slot in enumerate((self.offset % self.capacity).tolist()):
            self.cache[0, b, :, slot] = k[b, :, 0]
            self.cache[1, b, :, slot] = v[b, :, 0]

    def step_mask(self, first: int, context: int | None) -> torch.Tensor:
        """[B, first] bool: the slots that one step at each row's offset attends to, once written
        (``append``'s positions and the causal, in-context mask, in fewer ops). Slot s holds the
        step ``offset − d``, d = (offset − s) mod capacity: written since the row's reset iff
        d ≤ offset, in context iff d < context."""
        distance = (self.offset.view(-1, 1) - torch.arange(first, device=self.offset.device)) % self.capacity
        reach = self.offset if context is None else self.offset.clamp(max=context - 1)
        return distance <= reach.view(-1, 1)

    def _scatter(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the T steps of k and v [B, H, T, D] from each slot's offset on into the ring."""
        B, H, T, D = k.shape
        capacity = self.capacity
        written = self.offset.view(-1, 1) + torch.arange(T, device=k.device)
        # One row per (slot, head, step) in the flattened ring: index_copy_ moves the same values
        # as a scatter along the time axis, but a bf16 scatter_ on CPU costs in proportion to the
        # whole ring (0.25-2 ms per call at STT-1B size, ~25 ms at Moshi-7B's 3000 steps, so
        # ~1.7 s of the reference's 7B step), against ~5 µs for this.
        heads = torch.arange(B * H, device=k.device).view(B, H, 1) * capacity
        rows = (heads + (written % capacity).view(B, 1, T)).view(-1)
        rings = self.cache.view(2, B * H * capacity, D)
        rings[0].index_copy_(0, rows, k.reshape(-1, D).to(rings.dtype))
        rings[1].index_copy_(0, rows, v.reshape(-1, D).to(rings.dtype))


# The matmul attention (quantized models on CPU without our attention kernel) keeps a ring up to
# this size a slot in fp32. Without native bf16 math a bf16 matmul converts the ring at every call:
# at STT-1B's size (12 MB a layer in fp32) its int8 step over 745 steps of a stream took 54-62 ms
# in fp32 against 71-87 ms in bf16. Moshi-7B's ring (98 MB a layer) is no faster in fp32 (589-594
# against 552-596 ms a step over the whole ring) and would take 1.5 GB more.
FP32_RING_MAX_BYTES = 32 << 20
# The split of the keys in PyTorch's CPU flash-attention kernel: attending over a multiple of it
# gives the same blocks, and the same bits, as over a longer, masked ring.
FUSED_ATTENTION_BLOCK = 512


class Attention(StreamingModule):
    """Causal self-attention with a fused QKV projection, optional RoPE and a ring KV cache.

    With ``weights_per_step = n`` there are n projections and call number ``i`` of a streaming
    session uses the i-th: that is how the depth transformer gives each codebook its own weights.
    """

    # Set by engine/quant.py on quantized models on CPU, which need not round as the reference does:
    # a decoding step attends with the native kernel (engine/kernels/attend.c) where built, else
    # (and for several steps at once) with two matmuls instead of the fused kernel.
    fast_attention = False

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        steps = max(cfg.weights_per_step, 1)
        self.in_projs = nn.ModuleList(nn.Linear(cfg.dim, 3 * cfg.dim, bias=False) for _ in range(steps))
        self.out_projs = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(steps))

    def init_state(self, batch_size: int) -> KVCacheState:
        in_proj = self.in_projs[0]
        capacity = self.cfg.context or self.cfg.weights_per_step
        if not capacity:
            raise RuntimeError("a streaming attention needs a context or weights per step")
        # Quantized projections (engine/quant.py) hold integer weights but compute in a float dtype.
        dtype = getattr(in_proj, "compute_dtype", None) or in_proj.weight.dtype
        device = next(in_proj.parameters()).device
        shape = (2, batch_size, self.cfg.num_heads, capacity, self.cfg.head_dim)
        if (self.fast_attention and not kernels.attends(self.cfg.head_dim)
                and 4 * math.prod(shape) // batch_size <= FP32_RING_MAX_BYTES):
            dtype = torch.float32
        return KVCacheState(
            batch_size,
            device,
            cache=torch.zeros(shape, device=device, dtype=dtype),
            offset=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``angles``: RoPE's for this call's steps (``rope_angles``; computed here if not given)."""
        cfg = self.cfg
        B, T, _ = x.shape
        state = self.state
        # The call count matters only for per-step weights (and the CPU-only matmul attention);
        # not reading it otherwise keeps the temporal step free of a host integer that changes
        # every call (torch.compile guards on it).
        step = state.step if state is not None and cfg.weights_per_step else 0
        if cfg.weights_per_step and T != 1:
            raise ValueError("per-step weights take one step per call")
        in_proj, out_proj = self.in_projs[step % len(self.in_projs)], self.out_projs[step % len(self.out_projs)]

        qkv = in_proj(x).view(B, T, 3, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        offset = state.offset if state is not None else torch.zeros(B, device=x.device, dtype=torch.long)
        qk, v = qkv[:2], qkv[2]
        if cfg.max_period is not None:
            qk = apply_rope(qk, angles if angles is not None else rope_angles(offset, T, cfg.head_dim, cfg.max_period))
        q, k = qk[0], qk[1]

        written_only = x.device.type == "cpu" and not torch.compiler.is_compiling()  # host-side shapes
        # A decoding step of a quantized model on CPU: the native kernel, over the slots written.
        native = (self.fast_attention and written_only and state is not None and T == 1
                  and kernels.attends(cfg.head_dim))
        filled = None  # the ring's first slots attended to, where the host knows them
        if state is not None and written_only:
            # Until the ring wraps, every slot written since the last full reset lies below
            # this many (a slot reset mid-batch restarts lower): attend over those only. The
            # fused kernel then sees whole blocks of its own size, so it gives the same bits as
            # over the whole ring (masked blocks add exact zeros): the reference's tokens stay.
            filled = state.step + T
            if not self.fast_attention:
                filled = -(-filled // FUSED_ATTENTION_BLOCK) * FUSED_ATTENTION_BLOCK
            elif not native and state.cache.dtype == torch.bfloat16 and 3 * filled >= state.capacity:
                # oneDNN's bf16 matmuls run several times slower over a slice of the ring (strided
                # from head to head) than over the whole, contiguous one: from a third full on,
                # the whole ring with its unwritten slots masked is the faster (Moshi 7B, 2000 of
                # 3000 keys written: 3.1 against 8.1 ms a layer).
                filled = state.capacity
            filled = min(filled, state.capacity)
        if native:  # the whole ring: the kernel reads the `filled` slots the mask spans
            state.write_step(k, v)
            out = kernels.attend(q, state.cache[0], state.cache[1], state.step_mask(filled, cfg.context)).to(q.dtype)
        else:
            out = self._attend(q, k, v, offset, filled)
        out = out.transpose(1, 2).reshape(B, T, cfg.dim)
        out = out_proj(out)

        if state is not None:
            state.offset += T
            if cfg.weights_per_step or written_only:
                state.step += T
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor,
                filled: int | None) -> torch.Tensor:
        """softmax(q·kᵀ/√D)·v over the ring (after writing k and v to it), or over k and v alone
        without streaming state, with the mask from each slot's position."""
        cfg, state = self.cfg, self.state
        B, _, T, _ = q.shape
        if state is None:
            keys, values = k, v
            pos_k = torch.arange(T, device=q.device).expand(B, -1)
        else:
            keys, values, pos_k = state.append(k, v, filled)
        pos_q = offset.view(-1, 1, 1) + torch.arange(T, device=q.device).view(-1, 1)
        delta = pos_q - pos_k[:, None]
        mask = (pos_k[:, None] >= 0) & (delta >= 0)
        if cfg.context is not None:
            mask = mask & (delta < cfg.context)
        if filled is not None:
            keys, values = keys[:, :, :filled], values[:, :, :filled]
        if self.fast_attention:
            return matmul_attention(q, keys, values, mask[:, None])
        return F.scaled_dot_product_attention(q, keys, values, mask[:, None], dropout_p=0.0)


class CrossAttention(nn.Module):
    """Attention of the speech stream to a fixed set of image tokens: no RoPE, no mask, no cache.

    ``in_proj_weight`` is fused as in the official file: rows [0:dim] project the queries, [dim:2·dim]
    the keys and [2·dim:3·dim] the values. Keys and values depend on the image only, so they are
    projected once per image (``project_source``) and reused by every layer at every step.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, -1).transpose(1, 2)

    def project_source(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens [B, N, dim] -> keys and values [B, H, N, head_dim]."""
        _, weight_k, weight_v = self.in_proj_weight.chunk(3)
        return self._heads(F.linear(source, weight_k)), self._heads(F.linear(source, weight_v))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, T, dim = x.shape
        q = self._heads(F.linear(x, self.in_proj_weight[:dim]))
        out = F.scaled_dot_product_attention(q, keys, values)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, dim))


class CrossAttentionGate(nn.Module):
    """Per token and channel: ``sigmoid(W2 · relu(W1 · y) − 4)``; the shift starts the gate near 0."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = int(0.125 * dim)
        self.alpha = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha(y) - 4)


@dataclass
class CrossSource:
    """What the layers of one step need for cross-attention, and what they report back."""

    attention: CrossAttention  # the one module shared by all layers
    keys: torch.Tensor  # [B, H, N, head_dim]
    values: torch.Tensor
    weight: torch.Tensor  # [B] float: 1 for the slots attending the image this step, 0 for the others
    gates: list[torch.Tensor] = field(default_factory=list)  # each layer's mean gate [B], in layer order


class GatedCrossAttention(nn.Module):
    """One layer's use of the shared cross-attention: its output scaled by the layer's own gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = CrossAttentionGate(dim)

    def forward(self, x: torch.Tensor, source: CrossSource) -> torch.Tensor:
        y = source.attention(x, source.keys, source.values)
        gate = self.gate(y)
        source.gates.append(gate.float().mean(dim=(1, 2)))
        return y * gate * source.weight.to(y.dtype).view(-1, 1, 1)


@dataclass
class CrossAttentionState(StreamingState):
    """The image of a streaming session as keys/values (None: no image), and the last step's gate.

    A reset starts the conversation over but keeps the image: a new image is set explicitly.
    """

    gate: torch.Tensor  # [B] float32: mean gate of the last layers at the last step, 0 where not attending
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def reset(self, mask: torch.Tensor | None) -> None:
        # A new tensor, not in place: the previous step's output may still hold the old one.
        self.gate = torch.zeros_like(self.gate) if mask is None else torch.where(mask, 0.0, self.gate)


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(norm1(x))``, [``x + xattn(norm_cross(x))``,] then ``x + ffn(norm2(x))``."""

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
        if cfg.cross_attention:
            self.norm_cross = make_norm(cfg.norm, cfg.dim)
            self.cross_attention = GatedCrossAttention(cfg.dim)

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

    def forward(self, x: torch.Tensor, cross: CrossSource | None = None,
                angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        state = self.self_attn.state
        step = state.step if state is not None and self.cfg.weights_per_step else 0
        update = self.self_attn(self.norm1(x), angles)
        x = x.to(update) + self._scale(1, update)
        if cross is not None:
            update = self.cross_attention(self.norm_cross(x), cross)
            x = x.to(update) + update
        update = self.feed_forward(self.norm2(x), step)
        return x.to(update) + self._scale(2, update)


# The gate strength reported per step averages this many last layers, as the official server does.
GATE_READOUT_LAYERS = 10


class Transformer(StreamingModule):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.cross_attention:
            # Registered once here, not in each layer: one set of weights, one state-dict entry.
            self.shared_cross_attention = CrossAttention(cfg.dim, cfg.num_heads)

    def init_state(self, batch_size: int) -> StreamingState:
        if not self.cfg.cross_attention:
            return super().init_state(batch_size)
        device = self.shared_cross_attention.in_proj_weight.device
        return CrossAttentionState(batch_size, device, gate=torch.zeros(batch_size, device=device))

    def set_cross_source(self, source: torch.Tensor | None) -> None:
        """Attend to these image tokens [B or 1, N, dim] from now on (None: to nothing)."""
        state = self.state
        if not isinstance(state, CrossAttentionState):
            raise RuntimeError("set_cross_source needs a cross-attention transformer in streaming mode")
        state.gate = torch.zeros_like(state.gate)
        if source is None:
            state.keys = state.values = None
            return
        keys, values = self.shared_cross_attention.project_source(source)
        state.keys = keys.expand(state.batch_size, -1, -1, -1)
        state.values = values.expand(state.batch_size, -1, -1, -1)

    @property
    def gate_strength(self) -> torch.Tensor | None:
        """[B] mean cross-attention gate of the last step (0 where the image was not attended), on device."""
        state = self.state
        return state.gate if isinstance(state, CrossAttentionState) else None

    def forward(self, x: torch.Tensor, cross_active: torch.Tensor | None = None) -> torch.Tensor:
        """``cross_active`` [B] bool: which slots attend the image this step (default: all, if there is one)."""
        dtype = x.dtype
        cross = self._cross_source(x, cross_active)
        angles = None
        if self.cfg.max_period is not None:  # every layer has seen the same steps: the first stands for all
            ring = self.layers[0].self_attn.state
            offset = ring.offset if ring is not None else torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
            angles = rope_angles(offset, x.shape[1], self.cfg.head_dim, self.cfg.max_period)
        for layer in self.layers:
            x = layer(x, cross, angles)
        if cross is not None:
            self.state.gate = torch.stack(cross.gates[-GATE_READOUT_LAYERS:]).mean(dim=0) * cross.weight
        return x.to(dtype)

    def _cross_source(self, x: torch.Tensor, active: torch.Tensor | None) -> CrossSource | None:
        state = self.state
        if not isinstance(state, CrossAttentionState) or state.keys is None:
            return None
        weight = torch.ones(x.shape[0], device=x.device) if active is None else active.float()
        return CrossSource(self.shared_cross_attention, state.keys, state.values, weight)
