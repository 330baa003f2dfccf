"""ChatRunner: a conversation with Moshi, behind `moshi chat`."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EngineError
from ..options import Mode, ModelOptions
from ..runner import BaseRunner, FirstFrame, Progress, StepOutput, Stopwatch, load_models


class ChatRunner(BaseRunner):
    """Full-duplex conversation: the user's frame in, Moshi's voice and words for one frame out."""

    @classmethod
    def load(cls, options: ModelOptions, progress: Progress | None = None,
             first_frame: FirstFrame = FirstFrame.SERVER) -> ChatRunner:
        """The default ``first_frame`` is that of live sessions: the engine process loads with it."""
        models = load_models(options, Mode.CHAT.default_model, progress)
        if models.lm.cfg.dep_q == 0:
            raise EngineError(f"{models.name} is a speech-recognition model; use `moshi transcribe`")
        return cls(models, first_frame)

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        watch = Stopwatch(self.device)
        codes = self._encode(pcm)
        watch.lap("encode")
        tokens = self._lm_step(codes).tokens
        watch.lap("lm")
        if tokens is None:
            return StepOutput(None, None, watch.done())
        audio = self.models.mimi.decode(tokens[:, 1:])
        out = audio[0, 0].float().cpu().numpy()
        watch.lap("decode")
        token = int(tokens[0, 0, 0])
        return StepOutput(out, self.models.piece(token), watch.done(), token=token)
