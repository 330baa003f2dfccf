"""TranscribeRunner: Kyutai STT frame by frame, behind `moshi transcribe`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..encoder import EncoderProcess, pipeline_wanted, settle_encoder_process, start_encoder_process
from ..errors import EngineError
from ..mimi.loading import load_checkpoint_mimi
from ..options import Mode, ModelOptions
from ..runner import BaseRunner, FirstFrame, Models, Progress, StepOutput, Stopwatch, load_models


@dataclass
class TextStep:
    """One LM step over every slot of a batch."""

    tokens: list[int]  # the text token of each slot
    vad: list[list[float]] | None  # per slot, P(pause) over 0.5, 1, 2, 3 s; None without VAD heads


class TranscribeRunner(BaseRunner):
    """Streaming speech recognition: the user's frame in, at most one text piece out.

    ``step`` serves one live stream (batch size 1). The batched file path drives the stages itself
    (``submit``, ``lm_step``, ``collect``, ``reset_slots``) so that each slot can start a new input
    on its own.

    On a CPU with two cores or more Mimi runs in an ``EncoderProcess`` (``pipelined``): frame k is
    encoded while the LM reads frame k - 1, and ``step`` answers for the frame before the one it
    is given; ``flush`` gives the last one.
    """

    @classmethod
    def load(cls, options: ModelOptions, progress: Progress | None = None, batch_size: int = 1) -> TranscribeRunner:
        pipelined = pipeline_wanted(torch.device(options.device))
        codec = partial(start_encoder_process, batch_size=batch_size) if pipelined else load_checkpoint_mimi
        models = load_models(options, Mode.TRANSCRIBE.default_model, progress, load_codec=codec)
        try:
            if models.lm.cfg.dep_q != 0:
                raise EngineError(f"{models.name} is a conversation model; use `moshi chat`")
            if pipelined:
                settle_encoder_process(models.mimi)
        except BaseException:
            if pipelined:
                models.mimi.close()
            raise
        return cls(models, batch_size)

    def __init__(self, models: Models, batch_size: int = 1):
        super().__init__(models, FirstFrame.RUN_INFERENCE, batch_size)
        self._codes: torch.Tensor | None = None  # pipelined: the last frame's, for the next LM step

    @property
    def pipelined(self) -> bool:
        return isinstance(self.encoder, EncoderProcess)

    @property
    def delay_seconds(self) -> float:
        """How far the text lags the audio (learned in training, from the checkpoint's stt_config)."""
        return float(self.models.stt_config.get("audio_delay_seconds", 0.0))

    @property
    def silence_prefix_seconds(self) -> float:
        return float(self.models.stt_config.get("audio_silence_prefix_seconds", 0.0))

    @property
    def has_vad(self) -> bool:
        return len(self.models.lm.extra_heads) > 0

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "mimi": "own process" if self.pipelined else "in the engine"}

    def model_info(self) -> dict:
        """The model as a transcript file describes it (JSON values)."""
        models = self.models
        return {"name": models.name, "delay_seconds": self.delay_seconds,
                "silence_prefix_seconds": self.silence_prefix_seconds, "vad_heads": self.has_vad,
                "device": str(self.device), "dtype": str(models.lm.dtype).removeprefix("torch."),
                "temp_text": models.sampling.temp_text, "top_k_text": models.sampling.top_k_text}

    @torch.no_grad()
    def collect(self) -> torch.Tensor:
        """The Mimi codes [batch_size, n_q, 1] of the frames submitted last."""
        return self.encoder.collect().to(self.device)

    def no_codes(self) -> torch.Tensor:
        """Codes for an LM step whose audio input is never read: a stream's first step reads only
        the initial tokens (``moshi-inference`` feeds it the first frame, the batch path zeros)."""
        return torch.zeros(self.batch_size, self.models.lm.cfg.n_q, 1, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def lm_step(self, codes: torch.Tensor) -> TextStep:
        """One LM step on these codes, without the first-frame double feed (the caller's business)."""
        return self._text_step(self.gen.step_full(codes))

    def reset(self) -> None:
        super().reset()
        self._codes = None

    def reset_slots(self, slots: list[int]) -> None:
        """Start these slots over (Mimi and LM), leaving the others where they are."""
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[slots] = True
        self.encoder.reset(mask)
        self.gen.reset_streaming(mask)

    def _text_step(self, out) -> TextStep:
        vad = None
        if self.has_vad:
            # Element 0 of each head is the probability of a pause over its horizon.
            heads = [probs[:, 0, 0] for probs in self.models.lm.extra_head_probs(out.hidden)]
            vad = torch.stack(heads, dim=1).float().tolist()
        return TextStep(out.tokens[:, 0, 0].tolist(), vad)

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        watch = Stopwatch(self.device)
        if self.pipelined:
            self.submit(pcm)
            first = self._codes is None
            out = self.lm_step(self.no_codes() if first else self._codes)
            watch.lap("lm")
            self._codes = self.collect()
            watch.lap("encode")  # what the encoder took beyond the LM step
            if first:
                return StepOutput(None, None, watch.done())
        else:
            codes = self._encode(pcm)
            watch.lap("encode")
            out = self._text_step(self._lm_step(codes))
            watch.lap("lm")
        return self._output(out, watch)

    @torch.no_grad()
    def flush(self) -> StepOutput | None:
        """Pipelined: the LM step on the last frame given to ``step``; otherwise None."""
        if self._codes is None:
            return None
        watch = Stopwatch(self.device)
        out = self.lm_step(self._codes)
        self._codes = None
        watch.lap("lm")
        return self._output(out, watch)

    def _output(self, out: TextStep, watch: Stopwatch) -> StepOutput:
        token = out.tokens[0]
        return StepOutput(None, self.models.piece(token), watch.done(), token=token,
                          vad=out.vad[0] if out.vad else None)
