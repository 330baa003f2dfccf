"""MoshiVis: Moshika talking about a picture.

The model is our Moshi LM with cross-attention switched on in its temporal layers (one attention
module shared by all of them, a gate per layer) plus an ``ImagePrefix`` that turns the picture into
the tokens it attends to. With no image, or before ``xa_start`` steps, it computes exactly what the
plain LM computes.

RMSNorm variant: the official PyTorch code normalises by the unbiased variance (``rms_norm_f32``
there), while Moshi's own training definition, the Rust backend that runs the public demo and MLX
use mean(x²). The backbone is Moshika, frozen and trained with mean(x²), so mean(x²) is the default
(``rms_norm="mean_square"``); ``"variance"`` reproduces the PyTorch backend instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import CheckpointError
from ..moshi.generate import DEFAULT_XA_START
from ..moshi.model import LMConfig, LMModel
from .vision import ImagePrefix, VisionConfig, image_pixels

RMS_NORMS = {"mean_square": "rms_norm_f32", "variance": "rms_norm_f32_variance"}


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
