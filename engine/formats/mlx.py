"""Kyutai's MLX checkpoints (``kyutai/moshi{ka,ko}-mlx-{bf16,q8,q4}``), as ``moshi_mlx`` saves them.

The MLX layout renames the official one: ``audio_embs.N`` for ``emb.N``, ``self_attn.in_proj`` for
``in_proj_weight``, norms as ``.weight`` of shape (D,) for ``.alpha`` (1, 1, D), and the depth
transformer cut into ``depformer.slices.S``, each slice holding step S's input projection, embedding,
output head and transformer (whose norms are copies of the shared ones).

The q8 and q4 files are the bf16 model passed through MLX's ``nn.quantize`` (affine mode, 8 bits in
groups of 64, 4 bits in groups of 32): every linear and embedding becomes ``weight`` (uint32 words
of packed codes), ``scales`` and ``biases``; norms stay bf16. The files do not say which bits and
group size they use (moshi_mlx takes them from the file name), so they are read from the shapes:
a row of ``in`` inputs has ``in·bits/32`` words and ``in/group`` scales. A quantized file stays
quantized in memory (``engine/formats/affine.py``); a bf16 file loads as the official layout does,
``--quantize`` included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where a file is read: the checkpoint resolver lists lm_files
    import torch

    from ..moshi.model import LMModel

BITS = (4, 8)  # MLX's affine quantization also has 2, 3, 5 and 6 bits; Kyutai publishes 8 and 4

# MLX module names -> official ones (the leaf, weight/scales/biases, is kept).
_RENAMES = [
    (re.compile(r"audio_embs\.(\d+)"), r"emb.\1"),
    (re.compile(r"transformer\.layers\.(\d+)\.self_attn\.(in|out)_proj"), r"transformer.layers.\1.self_attn.\2_projs.0"),
    (re.compile(r"depformer\.slices\.(\d+)\.linear_in"), r"depformer_in.\1"),
    (re.compile(r"depformer\.slices\.(\d+)\.linear_out"), r"linears.\1"),
    (re.compile(r"depformer\.slices\.0\.emb"), "depformer_text_emb"),
    (re.compile(r"depformer\.slices\.(\d+)\.emb"), lambda m: f"depformer_emb.{int(m[1]) - 1}"),
    (re.compile(r"depformer\.slices\.(\d+)\.transformer\.layers\.(\d+)\.self_attn\.(in|out)_proj"),
     r"depformer.layers.\2.self_attn.\3_projs.\1"),
    (re.compile(r"depformer\.slices\.(\d+)\.transformer\.layers\.(\d+)\.gating\.(linear_in|linear_out)"),
     r"depformer.layers.\2.gating.\1.\3"),
    # every slice holds a copy of the shared norms
    (re.compile(r"depformer\.slices\.\d+\.transformer\.layers\.(\d+)\.(norm[12])"), r"depformer.layers.\1.\2"),
]
_NORM = re.compile(r"(^|\.)(out_norm|norm[12])$")


def _official_name(module: str) -> str:
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(module):
            return pattern.sub(replacement, module)
    return module


def to_official(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """MLX-layout tensors under official names (per-step attention names, norms as (1, 1, D)
    ``alpha``); a quantized weight's words are viewed as the bytes they hold."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        name = _official_name(module)
        if _NORM.search(name) and leaf == "weight":
            leaf, tensor = "alpha", tensor.view(1, 1, -1)
        elif tensor.dtype == torch.uint32:
            tensor = tensor.view(torch.uint8)  # little-endian words: the codes' bytes in order
        official = f"{name}.{leaf}"
        if official in out and not torch.equal(out[official], tensor):
            raise CheckpointError(f"{source}: the depth transformer slices hold different copies of {official}; "
                                  "moshi shares one norm across steps and cannot load this file")
        out[official] = tensor
    return out


def _bits_and_group(name: str, inputs: int, words: int, groups: int) -> tuple[int, int]:
    """Bits and group size of a quantized tensor of ``inputs`` columns stored as ``words`` uint32
    words and ``groups`` scales a row."""
    bits = 32 * words // inputs
    if bits not in BITS or 32 * words != bits * inputs or groups <= 0 or inputs % groups:
        raise CheckpointError(f"{name}: {words} packed words and {groups} scales for {inputs} inputs "
                              f"is not MLX's affine quantization with {' or '.join(map(str, BITS))} bits")
    return bits, inputs // groups


def _quantize_modules(model: LMModel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Swap each module the file holds quantized for its affine twin (the model is on the meta device)."""
    import torch
    from torch import nn

    from ..moshi.model import TokenEmbedding
    from ..quant import AffineLinear
    from .affine import AffineEmbedding

    for key in [k for k in state if k.endswith(".scales")]:
        name = key[:-len(".scales")]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, (nn.Linear, TokenEmbedding)):
            raise CheckpointError(f"{key}: the model has no linear or embedding {name} to quantize")
        weight = state.get(f"{name}.weight")
        if weight is None or weight.dtype != torch.uint8:
            raise CheckpointError(f"{key}: its packed weight {name}.weight is missing or not uint32")
        inputs = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        bits, group = _bits_and_group(name, inputs, weight.shape[1] // 4, state[key].shape[1])
        if isinstance(module, nn.Linear):
            affine = AffineLinear(module.in_features, module.out_features, bits, group, dtype)
        else:
            affine = AffineEmbedding(module.num_embeddings, module.embedding_dim, bits, group, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, affine)


def _logical_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as a float model has it: a packed weight's width in inputs (all
    quantized tensors of an MLX file have the bits of its text head)."""
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    if "text_linear.scales" not in state:
        return shapes
    dim = shapes["out_norm.alpha"][-1]
    bits, _ = _bits_and_group("text_linear", dim, shapes["text_linear.weight"][1] // 4,
                              shapes["text_linear.scales"][1])
    for key in state:
        weight = key[:-len(".scales")] + ".weight" if key.endswith(".scales") else None
        if weight in shapes:
            shapes[weight] = (shapes[weight][0], shapes[weight][1] * 8 // bits)
    return shapes


def load_mlx_lm(path: Path, lm_config: dict | None, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
    """An MLX file as our LM (``lm_config``: its config.json keys, or None to read the sizes from
    the shapes). In fp32 a quantized file computes with exactly its dequantized weights; in bf16 on
    a CPU its linears run on the CPU kernels (``engine.quant.AffineLinear``)."""
    import torch

    from .. import quant
    from ..moshi.loading import derive_ffn_hidden, load_lm_state
    from ..moshi.model import LMConfig, LMModel
    from ..weights import load_weights, read_safetensors

    source = str(path)
    device = torch.device(device)
    quant.check_mode(quantize)
    state = to_official(read_safetensors(path), source)
    if lm_config is None:
        from .shapes import lm_config_from_shapes

        lm_config = lm_config_from_shapes(_logical_shapes(state))
    cfg = LMConfig.from_dict(lm_config)
    if not any(key.endswith(".scales") for key in state):
        return load_lm_state(state, source, cfg, device, dtype, quantize)
    if quantize is not None:
        raise CheckpointError(f"{source} is already quantized (MLX); --quantize {quantize} needs a bf16 checkpoint")
    cfg = derive_ffn_hidden(cfg, state)
    with torch.device("meta"):
        model = LMModel(cfg)
    _quantize_modules(model, state, dtype)
    load_weights(model, state, source, dtype=dtype, device=device, copy_unaligned=False)
    del state
    if device.type == "cpu" and dtype != torch.float32:
        # the kernels, and the fast attention of the other quantized models; fp32 stays exact
        quant.finish_quantized(model, device)
    return model.eval()


def mlx_bits(path: Path) -> int | None:
    """0 for an MLX-layout bf16 file, its bits for a quantized one, None if not the MLX layout
    (or not a safetensors file). Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            if "out_norm.weight" not in keys or "audio_embs.0.weight" not in keys:
                return None
            if "text_linear.scales" not in keys:
                return 0
            inputs = f.get_slice("out_norm.weight").get_shape()[0]
            words = f.get_slice("text_linear.weight").get_shape()[1]
            groups = f.get_slice("text_linear.scales").get_shape()[1]
    except Exception:  # noqa: BLE001 - any unreadable file is simply not this format
        return None
    try:
        return _bits_and_group("text_linear", inputs, words, groups)[0]
    except CheckpointError:
        return None


@dataclass(frozen=True)
class MLXFormat:
    name: str
    lm_files: tuple[str, ...]
    bits: int  # 0: bf16

    def matches(self, path: Path) -> bool:
        return mlx_bits(path) == self.bits

    def load_lm(self, path: Path, lm_config: dict | None, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
        return load_mlx_lm(path, lm_config, device, dtype, quantize)


MLX_FORMATS = (
    MLXFormat("mlx-bf16", ("model.safetensors",), 0),
    MLXFormat("mlx-q8", ("model.q8.safetensors",), 8),
    MLXFormat("mlx-q4", ("model.q4.safetensors",), 4),
)
