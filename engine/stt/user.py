"""Kyutai STT on the user's side of a conversation: the user's words, live, beside Moshi's.

It reads the codes the conversation's Mimi computes anyway: Mimi's codebooks are residual, so its
first 8 are the same whether it computes 8 or 32; Moshi reads those 8 and STT all 32. Only the
STT language model runs on top, in the engine process, one step per frame.
"""

from __future__ import annotations

import statistics

import torch

from audio import FRAME_S

from ..errors import EngineError
from ..hub import MODELS
from ..moshi.generate import LMGen
from ..options import Mode, ModelOptions
from ..runner import Models, Progress, load_models

DEFAULT_USER_STT = Mode.TRANSCRIBE.default_model  # stt-1b-en_fr
AUTO = "auto"  # the default model, where it is cached and the warm step with it keeps to the budget
OFF = "off"


class UserSTT:
    """The STT language model, stepped on the conversation's codes; a text piece per frame."""

    def __init__(self, models: Models):
        self.models = models
        self.gen = LMGen(models.lm, models.sampling)
        self.gen.start_streaming(1)
        self._first_frame = True

    @classmethod
    def load(cls, name: str, options: ModelOptions, progress: Progress | None = None) -> UserSTT:
        """The STT model ``name`` on the conversation's device, dtype and quantization, without a
        Mimi of its own."""
        stt = ModelOptions(hf_repo=name, device=options.device, dtype=options.dtype, quantize=options.quantize)
        models = load_models(stt, DEFAULT_USER_STT, progress, load_codec=_no_codec)
        if models.lm.cfg.dep_q != 0:
            raise EngineError(f"--user-stt {name} is a conversation model; give a speech-recognition one "
                              f"({DEFAULT_USER_STT}, say) or off")
        return cls(models)

    @property
    def num_codebooks(self) -> int:
        return self.models.lm.cfg.n_q

    @torch.no_grad()
    def step(self, codes: torch.Tensor) -> str | None:
        """The user's text piece for one frame's codes [1, 32, 1] (None: padding or a special token)."""
        if self._first_frame:  # the convention of every runner here: the first frame is fed twice
            self._first_frame = False
            self.gen.step_full(codes)
        token = int(self.gen.step_full(codes).tokens[0, 0, 0])
        return self.models.piece(token)

    def reset(self) -> None:
        self.gen.reset_streaming()
        self._first_frame = True


def wanted(choice: str | None) -> str | None:
    """The STT model to load for ``--user-stt`` (None: none). ``auto`` takes the default model only
    when it is already in the Hugging Face cache: a conversation never waits on a download it did
    not ask for."""
    if choice is None or choice == OFF:
        return None
    if choice != AUTO:
        return choice
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(MODELS[DEFAULT_USER_STT], "config.json")
    return DEFAULT_USER_STT if isinstance(cached, str) else None


def keeps_to_budget(step_ms: list[float]) -> bool:
    """Whether warm steps of this median leave room in the 80 ms frame (a fifth of it spare)."""
    return statistics.median(step_ms) <= 0.8 * FRAME_S * 1000


def _no_codec(info, num_codebooks: int, device: torch.device, exact: bool) -> None:
    """The conversation's Mimi encodes for STT too."""
    return None
