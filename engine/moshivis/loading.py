"""Loading MoshiVis from its official checkpoint (kyutai/moshika-vis-pytorch-bf16).

That file has its own layout: ``llm.*`` for the text LM and temporal transformer,
``audio_emb.*``/``audio_linears.*`` for the audio tables, ``depformer*`` as in Moshi,
``image_prefix.*`` for the vision side, and the shared cross-attention stored under layer 0 only.
The repo has no config.json: the architecture is Moshi 7B's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import quant
from ..errors import CheckpointError
from ..weights import load_weights, read_safetensors, split_fused_attention
from .model import MoshiVis, MoshiVisConfig

_SHARED = "llm.transformer.layers.{}.cross_attention.mha."
_SHARED_NAMES = ("in_proj_weight", "out_proj.weight")
# (official prefix, our prefix). The first match wins in either direction, so specific prefixes
# come before the general ones they start with.
_LAYOUT = (
    (_SHARED.format(0), "lm.transformer.shared_cross_attention."),
    ("audio_emb.", "lm.emb."),
    ("audio_linears.", "lm.linears."),
    ("depformer", "lm.depformer"),
    ("image_prefix.enc.model.", "image_prefix.tower."),
    ("image_prefix.", "image_prefix."),
    ("llm.", "lm."),
)


def _rename(key: str, official_to_ours: bool) -> str:
    for official, ours in _LAYOUT:
        source, target = (official, ours) if official_to_ours else (ours, official)
        if key.startswith(source):
            return target + key[len(source):]
    return key  # left for the strict loader to report as unexpected


def to_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our module names -> the official file's (the shared cross-attention under layer 0 only)."""
    return {_rename(key, official_to_ours=False): tensor for key, tensor in state.items()}


def from_official_layout(state: dict[str, torch.Tensor], num_layers: int, source: str) -> dict[str, torch.Tensor]:
    """The official file's names -> our module names, checking the shared cross-attention."""
    if not any(key.startswith("image_prefix.") for key in state):
        raise CheckpointError(f"{source} is not a MoshiVis checkpoint: it has no image_prefix.* tensors "
                              "(a plain Moshi model? use `moshi chat`)")
    state = dict(state)
    for name in _SHARED_NAMES:
        first = _SHARED.format(0) + name
        if first not in state:
            others = sorted(k for k in state if k.startswith("llm.transformer.layers.0.cross_attention.")
                            and ".gate." not in k)
            found = f"; found instead: {', '.join(others)}" if others else ""
            raise CheckpointError(f"{source} lacks the shared cross-attention weight {first}{found}")
        # Some exports repeat the shared weights in every layer: accept them only if they are the same.
        for layer in range(1, num_layers):
            key = _SHARED.format(layer) + name
            copy = state.pop(key, None)
            if copy is not None and not torch.equal(copy.to(state[first].dtype), state[first]):
                raise CheckpointError(f"{source}: {key} differs from layer 0's, but MoshiVis shares one "
                                      "cross-attention across all layers")
    return {_rename(key, official_to_ours=True): tensor for key, tensor in state.items()}


def load_moshivis(weights: str | Path, cfg: MoshiVisConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> MoshiVis:
    """Load a checkpoint in the official layout. Every tensor is cast to ``dtype``, whatever it is stored
    in (the official loader also runs the vision tower in the LM's dtype).

    ``quantize`` ("int8" or "int4") quantizes the linears that ``load_lm`` quantizes in a Moshi LM,
    by the same rules: 7.4 B of MoshiVis's 8.3 B weights. The vision tower (0.4 B) stays in ``dtype``:
    it runs once per picture, so int8 would save memory but no step time. The cross-attention (0.2 B:
    the shared projections and each layer's gate) stays too, as trained: it is the whole path of the
    picture into the speech, and no quantized MoshiVis exists to check its gate against. Its price:
    each layer still reads its query/output projections and gate in ``dtype`` every step, about a
    third of the bytes of that layer's int8 linears.
    """
    quant.check_mode(quantize)
    device = torch.device(device)
    state = from_official_layout(read_safetensors(weights), cfg.lm.num_layers, str(weights))
    with torch.device("meta"):
        model = MoshiVis(cfg)
    if quantize is not None:
        names = [f"lm.{name}" for name in quant.quantized_linear_names(model.lm)]
        state = quant.quantize_state(split_fused_attention(model, state), names, quantize)
        quant.replace_linears(model, names, quantize, dtype)
    load_weights(model, state, str(weights), dtype=dtype, device=device)
    if quantize is not None:
        quant.finish_quantized(model, device)
    return model.eval()
