"""Kyutai's candle (Rust) checkpoints of Moshi: ``model.safetensors`` (bf16) and ``model.q8.gguf``.

Both hold the Rust layout, which differs from the official one only in the depth transformer: it
is cut into one slice per generated codebook, ``depformer.S.*``, each with its own input
projection (``linear_in``), head (``linear_out``), embedding (``emb``; slice 0 embeds text) and
transformer, whose norms are copies of the shared ones. The q8 file is a GGUF (version 2 from
candle's writer, 3 from llama.cpp's) whose 2-D tensors with a multiple of 32 inputs are Q8_0 and
everything else F32; its dims are listed innermost first. The Q8_0 linears load into
``BlockInt8Linear`` as they are stored; embeddings and the odd F32 linear are widened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..moshi.model import LMModel

# Only the Rust layout has it; the official layout's is depformer_in.0.weight.
RUST_KEY = "depformer.0.linear_in.weight"
GGUF_MAGIC = b"GGUF"

_SLICE = re.compile(r"depformer\.(\d+)\.(.+)")
_SLICE_LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)")
_TEMPORAL_FUSED = re.compile(r"(transformer\.layers\.\d+\.self_attn)\.(in_proj_weight|out_proj\.weight)")


def official_name(key: str) -> str:
    """The official (per-step attention) name of a Rust-layout tensor. Norms of every slice map to
    the one shared norm: ``load_state`` checks that the copies agree."""
    if match := _TEMPORAL_FUSED.fullmatch(key):  # the temporal transformer has one step
        return f"{match[1]}.{'in_projs' if match[2] == 'in_proj_weight' else 'out_projs'}.0.weight"
    match = _SLICE.fullmatch(key)
    if match is None:
        return key
    step, rest = int(match[1]), match[2]
    if rest == "linear_in.weight":
        return f"depformer_in.{step}.weight"
    if rest == "linear_out.weight":
        return f"linears.{step}.weight"
    if rest.startswith("emb."):
        return ("depformer_text_emb." if step == 0 else f"depformer_emb.{step - 1}.") + rest.removeprefix("emb.")
    layer = _SLICE_LAYER.fullmatch(rest)
    if layer is None:
        return key  # not a name of the Rust layout: the strict load names it
    index, part = layer[1], layer[2]
    if part.startswith("gating."):
        return f"depformer.layers.{index}.gating.{step}.{part.removeprefix('gating.')}"
    if part == "self_attn.in_proj_weight":
        return f"depformer.layers.{index}.self_attn.in_projs.{step}.weight"
    if part == "self_attn.out_proj.weight":
        return f"depformer.layers.{index}.self_attn.out_projs.{step}.weight"
    return f"depformer.layers.{index}.{part}"


def to_official(tensors: dict, equal, source: Path) -> dict:
    """Rename a Rust-layout dict of tensors; the per-slice copies of a norm must be ``equal``."""
    out = {}
    for key, tensor in tensors.items():
        name = official_name(key)
        if name in out:
            if not equal(out[name], tensor):
                raise CheckpointError(f"{source}: {key} differs from the other slices' copies of {name}, which "
                                      "moshi's depth transformer shares")
            continue
        out[name] = tensor
    return out


def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError):
        return set()


def _config(lm_config: dict | None, shapes: dict[str, tuple]):
    from ..moshi.model import LMConfig
    from .shapes import lm_config_from_shapes

    return LMConfig.from_dict(lm_config if lm_config is not None else lm_config_from_shapes(shapes))


class CandleSafetensors:
    """``kyutai/moshi{ka,ko}-candle-bf16``: the Rust layout in a safetensors file."""

    name = "candle-bf16"
    lm_files = ("model.safetensors",)

    def matches(self, path: Path) -> bool:
        return path.is_file() and not _is_gguf(path) and RUST_KEY in _safetensors_keys(path)

    def load_lm(self, path: Path, lm_config: dict | None, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
        import torch

        from ..moshi.loading import load_lm_state
        from ..weights import read_safetensors

        state = to_official(read_safetensors(path), torch.equal, path)
        cfg = _config(lm_config, {key: tuple(t.shape) for key, t in state.items()})
        return load_lm_state(state, str(path), cfg, device, dtype, quantize)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class CandleGGUF:
    """``kyutai/moshi{ka,ko}-candle-q8``: the Rust layout in a GGUF of Q8_0 and F32 tensors."""

    name = "candle-q8"
    lm_files = ("model.q8.gguf",)

    def matches(self, path: Path) -> bool:
        return path.is_file() and _is_gguf(path)

    def load_lm(self, path: Path, lm_config: dict | None, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
        import numpy as np
        import torch
        from torch import nn

        from .. import quant
        from ..moshi.model import LMModel
        from ..weights import check_state

        if quantize is not None:
            raise CheckpointError(f"{path} is already quantized (Q8_0); --quantize applies to bf16 checkpoints")
        tensors = to_official(read_gguf(path), lambda a, b: np.array_equal(a.data, b.data), path)
        cfg = _config(lm_config, {name: t.shape for name, t in tensors.items()})
        # Built on the meta device: nothing is allocated before the file's tensors are assigned.
        with torch.device("meta"):
            model = LMModel(cfg)
            # The Q8_0 linears and embeddings stay Q8_0; anything else stored so is widened.
            blocks, linears = {}, set(quant.quantized_linear_names(model))
            for name, module in model.named_modules():
                tensor = tensors.get(f"{name}.weight")
                if tensor is None or not tensor.q8_0:
                    continue
                if isinstance(module, nn.Linear) and name in linears:
                    blocks[name] = quant.BlockInt8Linear(module.in_features, module.out_features, dtype)
                elif isinstance(module, nn.Embedding):
                    blocks[name] = quant.BlockInt8Embedding(module.num_embeddings, module.embedding_dim, dtype)
        for name, block in blocks.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, block)
        # Every name and shape is checked before anything is read; then one tensor at a time is
        # read and its pages of the file dropped, and each Q8_0 linear is handed to its kernel
        # at once, so that only one layer's plain int8 copy exists at a time.
        expected = {}
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            if module in blocks and name.endswith(".weight"):
                rows, inputs = tensor.shape
                expected[name] = torch.empty(rows, inputs, device="meta")
                expected[f"{module}.scales"] = torch.empty(rows, inputs // quant.Q8_BLOCK, device="meta")
            else:
                expected[name] = torch.empty(tensor.shape, device="meta")
        check_state(model, expected, str(path))
        state: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            if module in blocks and name.endswith(".weight"):
                block = blocks[module]
                # PyTorch's int4 layout is made from the file's pages: no int8 copy of the layer.
                packs = isinstance(block, quant.BlockInt8Linear) and block.kernel(
                    block.in_features, block.out_features, device, dtype) == "int4"
                codes, scales = tensor.codes_and_scales(copy=not packs)
                block.weight = nn.Parameter(codes.to(device), requires_grad=False)
                block.scales = nn.Parameter(scales.to(device), requires_grad=False)
                if isinstance(block, quant.BlockInt8Linear):
                    block.prepare()
                    quant.trim_heap()
            else:
                state[name] = tensor.float32().to(dtype).to(device)
            tensor.release()
        # The Q8_0 modules are set; the shapes of everything were checked above.
        model.load_state_dict(state, strict=False, assign=True)
        del state
        quant.finish_quantized(model, device)
        return model.eval()


class GGUFTensor:
    """One tensor of a GGUF file, mapped from disk: its PyTorch shape and how to read it."""

    def __init__(self, name: str, tensor, path: Path):
        from gguf import GGMLQuantizationType

        self.kind = tensor.tensor_type
        if self.kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0):
            raise CheckpointError(f"{path}: tensor {name} is of GGUF type {self.kind.name}; moshi reads F32, F16 "
                                  "and Q8_0")
        self.q8_0 = self.kind == GGMLQuantizationType.Q8_0
        self.shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the innermost dim first
        self.data: np.ndarray = tensor.data

    def codes_and_scales(self, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Q8_0 blocks [rows, in/32, 2 + 32 bytes] -> int8 codes [rows, in], fp16 scales [rows, in/32].
        ``copy=False``: the codes as a view of the file, [rows, in/32, 32], read where they lie."""
        import numpy as np
        import torch

        from ..quant import Q8_BLOCK

        rows, inputs = self.shape
        blocks = self.data.reshape(rows, inputs // Q8_BLOCK, 2 + Q8_BLOCK)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        codes = blocks[..., 2:].view(np.int8)
        if copy:
            codes = np.ascontiguousarray(codes).reshape(rows, inputs)
        return torch.from_numpy(codes), torch.from_numpy(scales)

    def float32(self) -> torch.Tensor:
        """The values in fp32, exactly (Q8_0 through the gguf package's own dequantization)."""
        import numpy as np
        import torch
        from gguf import quants

        values = quants.dequantize(self.data, self.kind) if self.q8_0 else np.array(self.data, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape))

    def release(self) -> None:
        """Drop the file's pages of this tensor from memory: it has been read for the last time."""
        from ..quant import release_pages

        release_pages(self.data.ctypes.data, self.data.nbytes)


def read_gguf(path: Path) -> dict[str, GGUFTensor]:
    """The tensors of a GGUF file by name, mapped, not read; its metadata is ignored (moshi's
    files have none). A file gguf cannot parse, or a tensor type we do not read, is one line."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, mode="c")  # copy-on-write: torch takes its views without a warning
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(f"cannot read {path}: not a valid GGUF file ({exc})") from None
    return {tensor.name: GGUFTensor(tensor.name, tensor, path) for tensor in reader.tensors}


CANDLE_BF16 = CandleSafetensors()
CANDLE_Q8 = CandleGGUF()
