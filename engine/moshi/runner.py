"""ChatRunner: a conversation with Moshi, behind `moshi chat`."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EngineError
from ..interface import USER_WORDS
from ..options import Mode, ModelOptions
from ..runner import BaseRunner, FirstFrame, Models, Progress, StepOutput, Stopwatch, load_models
from ..stt.user import AUTO, UserSTT, keeps_to_budget, wanted

WARM_STEPS = 4  # timed after the warm-up, to decide whether `--user-stt auto` keeps the STT


class ChatRunner(BaseRunner):
    """Full-duplex conversation: the user's frame in, Moshi's voice and words for one frame out, and
    with a user STT the user's words of that frame."""

    @classmethod
    def load(cls, options: ModelOptions, progress: Progress | None = None,
             first_frame: FirstFrame = FirstFrame.SERVER) -> ChatRunner:
        """The default ``first_frame`` is that of live sessions: the engine process loads with it."""
        models = load_models(options, Mode.CHAT.default_model, progress)
        if models.lm.cfg.dep_q == 0:
            raise EngineError(f"{models.name} is a speech-recognition model; use `moshi transcribe`")
        name = wanted(options.user_stt)
        user = None
        if name is not None:
            (progress or (lambda text: None))(f"loading {name} for the user's words")
            user = UserSTT.load(name, options, progress)
        return cls(models, first_frame, user, auto=options.user_stt == AUTO)

    def __init__(self, models: Models, first_frame: FirstFrame, user: UserSTT | None = None, auto: bool = False):
        super().__init__(models, first_frame)
        self.input_codebooks = models.lm.cfg.n_q - models.lm.cfg.dep_q  # Moshi's: the user's 8
        self.user = user
        self.auto = auto  # the user STT goes if the warm step with it overruns the budget
        self.user_dropped = ""  # why `auto` let the user STT go
        if user is not None:
            models.mimi.set_num_codebooks(user.num_codebooks)

    def describe(self) -> dict[str, str]:
        info = {**super().describe(), USER_WORDS: "off" if self.user is None else self.user.models.name}
        return {**info, "user words dropped": self.user_dropped} if self.user_dropped else info

    def warmup(self, frames: int = 4) -> None:
        super().warmup(frames)
        if self.user is None or not self.auto:
            return
        steps = [self.step(np.zeros(self.frame_size, dtype=np.float32)).timings_ms["total"]
                 for _ in range(WARM_STEPS)]
        self.reset()
        if not keeps_to_budget(steps):
            self.user_dropped = f"the step with {self.user.models.name} takes {max(steps):.0f} ms of 80"
            self.user = None
            self.models.mimi.set_num_codebooks(self.input_codebooks)

    def reset(self) -> None:
        super().reset()
        if self.user is not None:
            self.user.reset()

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        watch = Stopwatch(self.device)
        # Under server.py's convention Mimi starts over after frame 0, so the conversation really
        # begins at frame 1: the user's STT starts there too, as a transcription of the audio from then on.
        restarts = self._at_first_frame and self.first_frame is FirstFrame.SERVER
        codes = self._encode(pcm)
        watch.lap("encode")
        user_text = None
        if self.user is not None and not restarts:
            user_text = self.user.step(codes)
            watch.lap("user stt")
        tokens = self._lm_step(codes[:, :self.input_codebooks]).tokens
        watch.lap("lm")
        if tokens is None:
            return StepOutput(None, None, watch.done(), user_text=user_text)
        audio = self.models.mimi.decode(tokens[:, 1:])
        out = audio[0, 0].float().cpu().numpy()
        watch.lap("decode")
        token = int(tokens[0, 0, 0])
        return StepOutput(out, self.models.piece(token), watch.done(), token=token, user_text=user_text)
