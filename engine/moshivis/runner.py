"""SeeRunner: a conversation with MoshiVis about a picture, behind `moshi see`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import EngineError
from ..moshi.generate import Sampling
from ..moshi.runner import ChatRunner
from ..options import Mode, SeeOptions
from ..runner import FirstFrame, Models, Progress, StepOutput, load_models
from .loading import load_moshivis
from .model import MoshiVis, MoshiVisConfig
from .vision import open_image

if TYPE_CHECKING:
    from PIL import Image

# The official MoshiVis web client's sampling; a checkpoint's lm_gen_config or the CLI override it.
SAMPLING = Sampling(temp=0.7, temp_text=0.45, top_k=250, top_k_text=25)


class SeeRunner(ChatRunner):
    """A conversation about a picture: ChatRunner, plus the picture and how much Moshi looks at it."""

    def __init__(self, models: Models, picture: Image.Image, xa_start: int, image_name: str = ""):
        super().__init__(models, FirstFrame.KYUTEYE_SERVER)
        self.model: MoshiVis = models.model
        self.gen.xa_start = xa_start
        self._gate: torch.Tensor | None = None
        self.set_image(picture, image_name)

    @classmethod
    def load(cls, options: SeeOptions, progress: Progress | None = None) -> SeeRunner:
        if options.image is None:
            raise EngineError("MoshiVis needs a picture to talk about")
        picture = open_image(options.image)  # before minutes of loading, a bad file fails now
        models = load_see_models(options, progress)
        xa_start = models.model.cfg.xa_start if options.xa_start is None else options.xa_start
        return cls(models, picture, xa_start, Path(options.image).name)

    def set_image(self, picture: Image.Image, name: str = "") -> None:
        """Look at this RGB picture (see ``vision.open_image``) from now on, in a new conversation:
        MoshiVis was trained with the picture at the start."""
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
    def step(self, pcm: np.ndarray) -> StepOutput:
        out = super().step(pcm)
        # The word of this step goes with this step's gate, as the official server colours it.
        out.gate = float(self._gate[0])
        return out


def load_see_models(options: SeeOptions, progress: Progress | None) -> Models:
    def load_vision_model(info, device: torch.device, dtype: torch.dtype, quantize: str | None) -> MoshiVis:
        cfg = MoshiVisConfig.from_checkpoint(info)
        return load_moshivis(info.lm_weights, cfg, device=device, dtype=dtype, quantize=quantize)

    return load_models(options, Mode.SEE.default_model, progress, load_vision_model, SAMPLING)
