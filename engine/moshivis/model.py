"""MoshiVis: Moshika talking about a picture.

The model is our Moshi LM with cross-attention switched on in its temporal layers (one attention
module shared by all of them, a gate per layer) plus an ``ImagePrefix`` that turns the picture into
the tokens it attends to. With no image, or before ``xa_start`` steps, it computes exactly what the
plain LM computes with the same depth transformer.

The RMSNorms are those of Kyutai's PyTorch MoshiVis code, which trained the released weights; it
builds two kinds, in three places:

- the temporal layers (``norm1``, ``norm2``, ``norm_cross``) and ``out_norm``: mean(x²), eps 1e-8,
  as in the plain Moshi LM;
- the depth transformer's layers: the unbiased variance of x instead of mean(x²), eps 1e-8;
- ``norm_xa``, after the image projection: the variance form, eps 1e-5 (``vision.ImagePrefix``).

Kyutai's Rust and MLX MoshiVis backends use mean(x²) with eps 1e-8 in all three places instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import CheckpointError
from ..wire import DEFAULT_XA_START
from ..moshi.model import LMConfig, LMModel
from .vision import ImagePrefix, VisionConfig, image_pixels


@dataclass
class MoshiVisConfig:
    lm: LMConfig = field(default_factory=LMConfig.moshi_7b)
    vision: VisionConfig = field(default_factory=VisionConfig.siglip_so400m_448)
    xa_start: int = DEFAULT_XA_START

    @classmethod
    def moshika_vis(cls) -> MoshiVisConfig:
        return cls()

    def model_lm(self) -> LMConfig:
        """The LM as MoshiVis builds it: cross-attention on, the depth transformer's norms in the variance form."""
        return replace(self.lm, cross_attention=True, depformer_norm="rms_norm_f32_variance")

    def section(self) -> dict:
        """What our config.json keeps under "moshivis" (the LM keys stay where Moshi's are)."""
        return {"vision": self.vision.to_dict(), "xa_start": self.xa_start}

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
                       xa_start=int(section.get("xa_start", DEFAULT_XA_START)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"bad \"moshivis\" section in {info.config_path}: {exc}") from None


class MoshiVis(nn.Module):
    def __init__(self, cfg: MoshiVisConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = LMModel(cfg.model_lm())
        self.image_prefix = ImagePrefix(cfg.vision, cfg.lm.dim)

    @torch.no_grad()
    def embed_image(self, picture) -> torch.Tensor:
        """An RGB PIL picture -> the tokens the LM cross-attends to, [1, N, dim] in the LM's dtype."""
        pixels = image_pixels(picture, self.cfg.vision.image_size).to(self.lm.device)
        return self.image_prefix(pixels)
