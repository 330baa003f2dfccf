"""ChatRunner: a conversation with Moshi, behind `moshi chat`."""

from __future__ import annotations

import statistics
from functools import partial
from typing import Callable

import numpy as np
import torch

from ..encoder import (EncoderProcess, lm_threads, pipeline_forced, pipeline_wanted, pipelining_pays,
                       settle_encoder_process, start_encoder_process)
from ..errors import EngineError
from ..interface import USER_WORDS
from ..mimi.loading import load_checkpoint_mimi
from ..options import Mode, ModelOptions
from ..runner import BaseRunner, FirstFrame, Models, Progress, StepOutput, Stopwatch, load_models
from ..stt.user import AUTO, UserSTT, keeps_to_budget, wanted

WARM_STEPS = 4  # timed after the warm-up, to decide whether `--user-stt auto` keeps the STT, and where Mimi runs
# Answers of a pipelined conversation come this many steps after the frame they answer.
PIPELINE_LAG = 2


class ChatRunner(BaseRunner):
    """Full-duplex conversation: the user's frame in, Moshi's voice and words for one frame out, and
    with a user STT the user's words of that frame.

    A live session on a CPU with two cores or more may run Mimi in an ``EncoderProcess``
    (``pipelined``): while the LM steps on frame k - 1, that process encodes frame k and decodes the
    LM's answer to frame k - 2, so a frame costs max(LM step, encode + decode) instead of their sum.
    Each answer then comes two steps later than in one process, the same answers (``flush`` gives
    the last two; ``StepOutput.late`` says it); the first two steps answer nothing. ``warmup`` times
    the two stages and pipelines only where that pays (``pipelining_pays``).
    """

    @classmethod
    def load(cls, options: ModelOptions, progress: Progress | None = None,
             first_frame: FirstFrame = FirstFrame.SERVER) -> ChatRunner:
        """The default ``first_frame`` is that of live sessions: the engine process loads with it.
        Only they may be pipelined: a file run's answers stay frame by frame with its input."""
        live_cpu = first_frame is FirstFrame.SERVER and pipeline_wanted(torch.device(options.device))
        pipeline: list[Callable[[int], EncoderProcess]] = []

        def load_codec(info, num_codebooks: int, device: torch.device, exact: bool):
            # Mimi in this process; the warm-up may move it into a process of its own, from the same file.
            pipeline.append(partial(start_encoder_process, info, device=device, exact=exact))
            return load_checkpoint_mimi(info, num_codebooks, device, exact)

        models = load_models(options, Mode.CHAT.default_model, progress, load_codec=load_codec)
        if models.lm.cfg.dep_q == 0:
            raise EngineError(f"{models.name} is a speech-recognition model; use `moshi transcribe`")
        name = wanted(options.user_stt)
        user = None
        if name is not None:
            (progress or (lambda text: None))(f"loading {name} for the user's words")
            user = UserSTT.load(name, options, progress)
        runner = cls(models, first_frame, user, auto=options.user_stt == AUTO)
        runner.start_mimi_process = pipeline[0] if live_cpu else None
        return runner

    def __init__(self, models: Models, first_frame: FirstFrame, user: UserSTT | None = None, auto: bool = False):
        super().__init__(models, first_frame)
        self.input_codebooks = models.lm.cfg.n_q - models.lm.cfg.dep_q  # Moshi's: the user's 8
        self.user = user
        self.auto = auto  # the user STT goes if the warm step with it overruns the budget
        self.user_dropped = ""  # why `auto` let the user STT go
        # Starts Mimi's process (given the codebooks to encode) where the warm-up finds it pays; None: never.
        self.start_mimi_process: Callable[[int], EncoderProcess] | None = None
        self.stages = ""  # what the warm-up measured of the LM and Mimi, and so where Mimi runs
        if user is not None:
            models.mimi.set_num_codebooks(user.num_codebooks)
        # Pipelined: the codes of the last frame encoded, for the next LM step, and the LM's last
        # answer (its tokens and the user's words beside them), for the next decode.
        self._codes: torch.Tensor | None = None
        self._answer: tuple[torch.Tensor | None, str | None] | None = None

    @property
    def pipelined(self) -> bool:
        return isinstance(self.encoder, EncoderProcess)

    def describe(self) -> dict[str, str]:
        info = {**super().describe(), USER_WORDS: "off" if self.user is None else self.user.models.name,
                "mimi": "own process" if self.pipelined else "in the engine"}
        if self.stages:
            info["mimi stages"] = self.stages
        return {**info, "user words dropped": self.user_dropped} if self.user_dropped else info

    def warmup(self, frames: int = 4) -> None:
        super().warmup(frames)
        if self.user is not None and self.auto:
            steps = self._timed_steps()
            if not keeps_to_budget([laps["total"] for laps in steps]):
                slowest = max(laps["total"] for laps in steps)
                self.user_dropped = f"the step with {self.user.models.name} takes {slowest:.0f} ms of 80"
                self.user = None
                self.models.mimi.set_num_codebooks(self.input_codebooks)
        if self.start_mimi_process is not None:
            self._place_mimi()

    def _timed_steps(self) -> list[dict[str, float]]:
        """The stage times of WARM_STEPS steps on silence, after which the conversation starts over."""
        steps = [self.step(np.zeros(self.frame_size, dtype=np.float32)).timings_ms for _ in range(WARM_STEPS)]
        self.reset()
        return steps

    def _place_mimi(self) -> None:
        """Time the LM and Mimi with the threads the LM would have beside Mimi's process (on two
        cores: one each, as they would run apart), and move Mimi into its own process if that pays
        (or ``MOSHI_PIPELINE=1`` asks for it)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(lm_threads())
        steps = self._timed_steps()
        lm_ms = statistics.median(laps["lm"] + laps.get("user stt", 0.0) for laps in steps)
        # The LM answers nothing (so nothing is decoded) before its delays are filled.
        mimi_ms = statistics.median(laps["encode"] + laps["decode"] for laps in steps if "decode" in laps)
        pays = pipelining_pays(lm_ms, mimi_ms)
        self.stages = f"LM {lm_ms:.0f} ms + Mimi {mimi_ms:.0f} ms a frame"
        if not (pays or pipeline_forced()):
            torch.set_num_threads(threads)
            return
        process = self.start_mimi_process(self.models.mimi.num_codebooks)
        try:
            settle_encoder_process(process)
        except BaseException:
            process.close()
            raise
        self.encoder.close()
        self.models.mimi = self.encoder = process  # the in-process Mimi goes

    def reset(self) -> None:
        super().reset()
        self._codes = self._answer = None
        if self.user is not None:
            self.user.reset()

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        if self.pipelined:
            return self._pipelined_step(pcm)
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

    def _pipelined_step(self, pcm: np.ndarray | None) -> StepOutput:
        """Frame k in (None: no more frames); the LM on frame k - 1 meanwhile; the answer to k - 2 out."""
        watch = Stopwatch(self.device)
        tokens, user_text = self._answer or (None, None)
        if pcm is not None or tokens is not None:
            self.submit(pcm, decode=None if tokens is None else tokens[:, 1:])
        if pcm is not None and self._codes is None and self._at_first_frame and self.first_frame is FirstFrame.SERVER:
            # server.py's restart of Mimi after frame 0, in order before frame 1 is encoded;
            # the LM's step on frame 0 (next call) must not restart it again.
            self.encoder.reset()
        codes, self._codes, self._answer = self._codes, None, None
        if codes is not None:
            self._answer = self._answer_frame(codes, watch)
        watch.lap("lm")
        if pcm is not None or tokens is not None:
            self._codes = self.encoder.collect()
        watch.lap("mimi")  # what Mimi took beyond the LM step
        if tokens is None:
            return StepOutput(None, None, watch.done(), user_text=user_text, late=PIPELINE_LAG)
        token = int(tokens[0, 0, 0])
        out = self.encoder.decoded()[0, 0]
        return StepOutput(out, self.models.piece(token), watch.done(), token=token, user_text=user_text,
                          late=PIPELINE_LAG)

    def _answer_frame(self, codes: torch.Tensor, watch: Stopwatch) -> tuple[torch.Tensor | None, str | None]:
        """The LM's tokens for these codes, and the user's words of the frame."""
        restarts = self._at_first_frame and self.first_frame is FirstFrame.SERVER
        user_text = None
        if self.user is not None and not restarts:
            user_text = self.user.step(codes)
            watch.lap("user stt")
        if self._at_first_frame and self.first_frame is FirstFrame.SERVER:
            self._at_first_frame = False  # Mimi was restarted when frame 0 was sent
        return self._lm_step(codes[:, :self.input_codebooks]).tokens, user_text

    @torch.no_grad()
    def flush(self) -> list[StepOutput]:
        """Pipelined: the answers to the last two frames given to ``step``; otherwise none."""
        outputs = []
        while self.pipelined and (self._codes is not None or self._answer is not None):
            outputs.append(self._pipelined_step(None))
        return outputs
