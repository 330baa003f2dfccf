"""MoshiVis: Moshika talking about a picture.

The model is our Moshi LM with cross-attention switched on in its temporal layers (one attention
module shared by all of them, a gate per layer) plus an ``ImagePrefix`` that turns the picture into
the tokens it attends to. With no image, or before ``xa_start`` steps, it computes exactly what the
plain LM computes.

The official checkpoint (kyutai/moshika-vis-pytorch-bf16, moshivis.md §5) has its own layout:
``llm.*`` for the text LM and temporal transformer, ``audio_emb.*``/``audio_linears.*`` for the
audio tables, ``depformer*`` as in Moshi, ``image_prefix.*`` for the vision side, and the shared
cross-attention stored under layer 0 only. It has no config.json: the architecture is Moshi 7B's.

RMSNorm variant: the official PyTorch code normalises by the unbiased variance (``rms_norm_f32``
there), while Moshi's own training definition, the Rust backend that runs the public demo and MLX
use mean(x²). The backbone is Moshika, frozen and trained with mean(x²), so mean(x²) is the default
(``rms_norm="mean_square"``); ``"variance"`` reproduces the PyTorch backend instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from . import quant
from .errors import CheckpointError, EngineError
from .lm import LMConfig, LMModel, random_lm_state
from .lm_gen import DEFAULT_XA_START, Sampling
from .options import SeeOptions
from .runner import ChatRunner, Models, Progress, StepOutput, load_models
from .tiny import write_tiny_checkpoint
from .vision import ImagePrefix, VisionConfig, image_pixels, open_image, random_image_prefix_state
from .weights import load_weights, read_safetensors, split_fused_attention

RMS_NORMS = {"mean_square": "rms_norm_f32", "variance": "rms_norm_f32_variance"}
# The official web client's sampling (moshivis.md §6); a checkpoint's lm_gen_config or the CLI override it.
SAMPLING = Sampling(temp=0.7, temp_text=0.45, top_k=250, top_k_text=25)


@dataclass
class MoshiVisConfig:
    lm: LMConfig = field(default_factory=LMConfig.moshi_7b)
    vision: VisionConfig = field(default_factory=VisionConfig.siglip_so400m_448)
    rms_norm: str = "mean_square"  # or "variance": see the module docstring
    xa_start: int = DEFAULT_XA_START

    def __post_init__(self) -> None:
        if self.rms_norm not in RMS_NORMS:
            raise ValueError(f"rms_norm must be one of {', '.join(RMS_NORMS)}, not {self.rms_norm!r}")

    @classmethod
    def moshika_vis(cls) -> MoshiVisConfig:
        return cls()

    @classmethod
    def tiny(cls) -> MoshiVisConfig:
        return cls(lm=LMConfig.tiny_moshi(), vision=VisionConfig.tiny())

    def model_lm(self) -> LMConfig:
        """The LM as MoshiVis builds it: cross-attention on, and the chosen RMSNorm everywhere."""
        return replace(self.lm, cross_attention=True, norm=RMS_NORMS[self.rms_norm])

    def section(self) -> dict:
        """What our config.json keeps under "moshivis" (the LM keys stay where Moshi's are)."""
        return {"vision": self.vision.to_dict(), "rms_norm": self.rms_norm, "xa_start": self.xa_start}

    @classmethod
    def from_checkpoint(cls, info) -> MoshiVisConfig:
        """From a resolved checkpoint (``hub.CheckpointInfo``): the official repo has no config.json."""
        if info.raw_config is None:
            return cls.moshika_vis()
        section = info.raw_config.get("moshivis")
        if not isinstance(section, dict):
            raise CheckpointError(f"{info.repo} is not a MoshiVis model (its config.json has no \"moshivis\" "
                                  "section); use `moshi chat`")
        try:
            return cls(lm=LMConfig.from_dict(info.lm_config), vision=VisionConfig.from_dict(section["vision"]),
                       rms_norm=section.get("rms_norm", "mean_square"),
                       xa_start=int(section.get("xa_start", DEFAULT_XA_START)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"bad \"moshivis\" section in {info.config_path}: {exc}") from None


class MoshiVis(nn.Module):
    def __init__(self, cfg: MoshiVisConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = LMModel(cfg.model_lm())
        self.image_prefix = ImagePrefix(cfg.vision, cfg.lm.dim, variance=cfg.rms_norm == "variance")

    @torch.no_grad()
    def embed_image(self, picture) -> torch.Tensor:
        """An RGB PIL picture -> the tokens the LM cross-attends to, [1, N, dim] in the LM's dtype."""
        pixels = image_pixels(picture, self.cfg.vision.image_size).to(self.lm.device)
        return self.image_prefix(pixels)


# -- the official layout ----------------------------------------------------------------------

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
    if quantize is not None and quantize not in quant.MODES:
        raise CheckpointError(f"unknown quantization {quantize!r}; choose one of {', '.join(quant.MODES)}")
    device = torch.device(device)
    state = from_official_layout(read_safetensors(weights), cfg.lm.num_layers, str(weights))
    with torch.device("meta"):
        model = MoshiVis(cfg)
    if quantize is not None:
        names = [f"lm.{name}" for name in quant.quantized_linear_names(model.lm)]
        state = quant.quantize_state(split_fused_attention(model, state), names, quantize, device)
        quant.replace_linears(model, names, quantize, dtype, device)
    load_weights(model, state, str(weights), dtype=dtype, device=device)
    if quantize is not None:
        quant.finish_quantized(model, device)
    return model.eval()


def write_tiny_moshivis_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """The tiny chat checkpoint of the same seed (same tokenizer, Mimi and LM weights) turned into a
    MoshiVis one: random gates, shared cross-attention and vision side, saved in the official layout.

    The vision tower is stored in fp32 and everything else in bf16, so loading sees mixed dtypes.
    """
    folder = write_tiny_checkpoint(folder, "chat", seed)
    config = json.loads((folder / "config.json").read_text())
    cfg = MoshiVisConfig(lm=LMConfig.from_dict(config), vision=VisionConfig.tiny())
    plain = read_safetensors(folder / "model.safetensors")
    adapters = {k: v for k, v in random_lm_state(cfg.model_lm(), seed + 1).items() if k not in plain}
    state = {f"lm.{k}": v for k, v in {**plain, **adapters}.items()}
    for name, tensor in random_image_prefix_state(cfg.vision, cfg.lm.dim, seed).items():
        state[f"image_prefix.{name}"] = tensor if name.startswith("tower.") else tensor.to(torch.bfloat16)
    # The plain weights are memory-mapped from the file being replaced: write aside, then swap.
    partial = folder / "model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in to_official_layout(state).items()}, partial)
    os.replace(partial, folder / "model.safetensors")
    config.update(model_type="moshivis", moshivis=cfg.section())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- the runner -------------------------------------------------------------------------------


@dataclass
class SeeStepOutput(StepOutput):
    gate: float | None = None  # how much Moshi looked at the picture this step (mean gate, ~0.02 to ~0.1)


class SeeRunner(ChatRunner):
    """A conversation about a picture: ChatRunner, plus the picture and how much Moshi looks at it."""

    def __init__(self, models: Models, picture, xa_start: int, image_name: str = ""):
        super().__init__(models)
        self.model: MoshiVis = models.model
        self.gen.xa_start = xa_start
        self._gate: torch.Tensor | None = None
        self.set_image(picture, image_name)

    @classmethod
    def load(cls, options: SeeOptions, progress: Progress | None = None) -> SeeRunner:
        if options.image is None:
            raise EngineError("MoshiVis needs a picture to talk about")
        picture = open_image(options.image)  # before minutes of loading, a bad file fails now
        models = _load_models(options, progress)
        xa_start = models.model.cfg.xa_start if options.xa_start is None else options.xa_start
        return cls(models, picture, xa_start, Path(options.image).name)

    def set_image(self, picture, name: str = "") -> None:
        """Look at this RGB picture (see ``vision.open_image``) from now on, in a new conversation:
        MoshiVis was trained with the picture at the start."""
        self.picture = picture
        self.image_name = name
        self.gen.set_cross_source(self.model.embed_image(picture))
        self.reset()

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "image": self.image_name}

    def _lm_step(self, codes: torch.Tensor):
        out = super()._lm_step(codes)
        self._gate = out.gate
        return out

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> SeeStepOutput:
        out = super().step(pcm)
        # The word of this step goes with this step's gate, as the official server colours it.
        return SeeStepOutput(**vars(out), gate=float(self._gate[0]))


def _load_models(options: SeeOptions, progress: Progress | None) -> Models:
    def load_vision_model(info, device: torch.device, dtype: torch.dtype, quantize: str | None) -> MoshiVis:
        cfg = MoshiVisConfig.from_checkpoint(info)
        if options.rms_norm is not None:
            cfg = replace(cfg, rms_norm=options.rms_norm)
        return load_moshivis(info.lm_weights, cfg, device=device, dtype=dtype, quantize=quantize)

    return load_models(options, "moshika-vis", progress, load_vision_model, SAMPLING)
