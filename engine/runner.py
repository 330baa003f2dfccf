"""Frame-by-frame runners: the one interface between the models and everything that feeds them
(the headless commands, the engine process behind the TUI).

A runner takes 80 ms of the user's audio (1920 float32 samples at 24 kHz) per call and returns
what the model produced for that frame. It keeps Mimi and the LM in streaming mode for its whole
life; ``reset()`` starts a new conversation with the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from .encoder import EncoderProcess, InlineEncoder, pipeline_wanted, usable_cores
from .errors import EngineError
from .lm import LMConfig, LMModel, load_lm
from .lm_gen import LMGen, Sampling
from .options import ModelOptions
from .quant import quantization_of

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920
# Seed of Kyutai's `moshi-inference`, so that sampled runs can be compared with it.
DEFAULT_SEED = 4242
# Text ids that are not words: 0 ends a stretch of padding, 3 is padding.
NON_WORD_TOKENS = (0, 3)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

Progress = Callable[[str], None]


@dataclass
class Models:
    name: str
    model_type: str
    mimi: torch.nn.Module
    lm: LMModel
    model: torch.nn.Module  # what the checkpoint holds: the LMModel, or a model wrapping it (MoshiVis)
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    sampling: Sampling
    stt_config: dict = field(default_factory=dict)
    quantize: str | None = None  # "int8" (a q8 checkpoint, or --quantize) or "int4"

    def piece(self, token: int) -> str | None:
        """The text of a token as the reference prints it, or None for padding."""
        if token in NON_WORD_TOKENS:
            return None
        return self.tokenizer.id_to_piece(token).replace("▁", " ")


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but PyTorch sees no CUDA GPU (try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EngineError("--device mps was asked for, but MPS is not available here (try --device cpu)")
    return device


def _load_plain_lm(info, device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> LMModel:
    return load_lm(info.lm_weights, LMConfig.from_dict(info.lm_config), device=device, dtype=dtype,
                   quantize=quantize)


def _mimi_config(info):
    from .mimi import MimiConfig

    return MimiConfig.from_dict(info.mimi_config) if info.mimi_config else None


def _load_mimi_here(info, num_codebooks: int, device: torch.device):
    from .mimi import load_mimi

    return load_mimi(info.mimi_weights, _mimi_config(info), num_codebooks=num_codebooks, device=device)


def load_models(options: ModelOptions, default_repo: str, progress: Progress | None = None,
                load_language_model: Callable = _load_plain_lm, default_sampling: Sampling | None = None,
                load_codec: Callable = _load_mimi_here) -> Models:
    """Resolve the checkpoint, then load Mimi, the LM and the tokenizer onto the device.

    ``load_language_model(info, device, dtype, quantize)`` returns the LMModel, or a model wrapping
    one as ``.lm`` (MoshiVis); ``default_sampling`` applies where the checkpoint's lm_gen_config is
    silent; ``load_codec(info, num_codebooks, device)`` returns Mimi, or an ``EncoderProcess`` that
    runs it (started first, so that it loads while the LM does).
    """
    import sentencepiece

    from .hub import CheckpointInfo

    report = progress or (lambda message: None)
    if options.dtype not in DTYPES:
        raise EngineError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    device = _resolve_device(options.device)
    repo = options.hf_repo or default_repo
    report(f"resolving {repo}")
    info = CheckpointInfo.resolve(repo)

    tokenizer = sentencepiece.SentencePieceProcessor()
    if not tokenizer.Load(str(info.tokenizer)):
        raise EngineError(f"cannot read the text tokenizer {info.tokenizer}")
    report("loading Mimi")
    lm_config = LMConfig.from_dict(info.lm_config)
    mimi = load_codec(info, max(lm_config.dep_q, lm_config.n_q - lm_config.dep_q), device)
    report("loading the language model" + (f" ({options.quantize})" if options.quantize else ""))
    try:
        model = load_language_model(info, device, DTYPES[options.dtype], options.quantize)
    except BaseException:
        if isinstance(mimi, EncoderProcess):
            mimi.close()  # it was loading beside the LM
        raise
    lm = getattr(model, "lm", model)

    defaults = (default_sampling or Sampling()).__dict__
    gen_config = {**defaults, **{k: v for k, v in info.lm_gen_config.items() if k in defaults}}
    for key in defaults:
        if getattr(options, key) is not None:
            gen_config[key] = getattr(options, key)
    torch.manual_seed(DEFAULT_SEED if options.seed is None else options.seed)
    return Models(name=repo, model_type=info.model_type, mimi=mimi, lm=lm, model=model, tokenizer=tokenizer,
                  sampling=Sampling(**gen_config), stt_config=dict(info.stt_config), quantize=quantization_of(lm))


class _Stopwatch:
    """Per-stage wall times; on a GPU each lap waits for the queued work so the figure is real."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = (now - self._last) * 1000
        self._last = now

    def done(self) -> dict[str, float]:
        self.laps["total"] = (self._last - self._start) * 1000
        return self.laps


@dataclass
class StepOutput:
    pcm: np.ndarray | None  # 1920 samples of Moshi's voice for this frame; None before its first frame
    text: str | None  # the text piece of this frame, None for padding
    timings_ms: dict[str, float]
    token: int | None = None  # the raw text token (None before the first frame)
    vad: list[float] | None = None  # STT with VAD heads: P(pause) over 0.5, 1, 2, 3 s


class _Runner:
    frame_size = FRAME_SIZE
    sample_rate = SAMPLE_RATE

    def __init__(self, models: Models, batch_size: int = 1):
        self.models = models
        self.gen = LMGen(models.lm, models.sampling)
        self.device = models.lm.device
        self.batch_size = batch_size
        mimi = models.mimi
        self.encoder = mimi if isinstance(mimi, EncoderProcess) else InlineEncoder(mimi, self.device, batch_size)
        self.gen.start_streaming(batch_size)
        self._first_frame = True

    def describe(self) -> dict[str, str]:
        return {"model": self.models.name, "device": str(self.device), "dtype": str(self.models.lm.dtype).split(".")[-1],
                "quantize": self.models.quantize or "none", "steps": self.gen.acceleration}

    def reset(self) -> None:
        self.encoder.reset()
        self.gen.reset_streaming()
        self._first_frame = True

    def close(self) -> None:
        """End the encoder process, if Mimi runs in one."""
        self.encoder.close()

    def warmup(self, frames: int = 4) -> None:
        for _ in range(frames):
            self.step(np.zeros(FRAME_SIZE, dtype=np.float32))
        self.reset()

    def _encode(self, pcm: np.ndarray) -> torch.Tensor:
        """One frame (FRAME_SIZE,) with batch size 1, or one per slot (batch_size, FRAME_SIZE)."""
        self.submit(pcm)
        return self.encoder.collect()

    def submit(self, pcm: np.ndarray) -> None:
        """Start encoding one frame per slot ([batch_size, FRAME_SIZE]); ``collect`` gives the codes."""
        if pcm.shape != (FRAME_SIZE,) and pcm.shape != (self.batch_size, FRAME_SIZE):
            raise ValueError(f"a frame is {FRAME_SIZE} samples per slot, got shape {pcm.shape}")
        self.encoder.submit(pcm.reshape(self.batch_size, FRAME_SIZE))

    def _lm_step(self, codes: torch.Tensor):
        # `moshi-inference`'s convention: the model never sees its first input frame, so the first
        # frame's codes are fed twice.
        if self._first_frame:
            self._first_frame = False
            self.gen.step_full(codes)
        return self.gen.step_full(codes)


class ChatRunner(_Runner):
    """Full-duplex conversation: the user's frame in, Moshi's voice and words for one frame out."""

    @classmethod
    def load(cls, options: ModelOptions, progress: Progress | None = None) -> ChatRunner:
        models = load_models(options, "moshika", progress)
        if models.lm.cfg.dep_q == 0:
            raise EngineError(f"{models.name} is a speech-recognition model; use `moshi transcribe`")
        return cls(models)

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        watch = _Stopwatch(self.device)
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


@dataclass
class TextStep:
    """One LM step over every slot of a batch."""

    tokens: list[int]  # the text token of each slot
    vad: list[list[float]] | None  # per slot, P(pause) over 0.5, 1, 2, 3 s; None without VAD heads


class TranscribeRunner(_Runner):
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
        codec = partial(_start_encoder_process, batch_size=batch_size) if pipelined else _load_mimi_here
        models = load_models(options, "stt-1b-en_fr", progress, load_codec=codec)
        try:
            if models.lm.cfg.dep_q != 0:
                raise EngineError(f"{models.name} is a conversation model; use `moshi chat`")
            if pipelined:
                # The encoder has a core of its own; the LM takes the others.
                torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - 1)))
                models.mimi.wait_ready()
        except BaseException:
            if pipelined:
                models.mimi.close()
            raise
        return cls(models, batch_size)

    def __init__(self, models: Models, batch_size: int = 1):
        super().__init__(models, batch_size)
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
            heads = [torch.softmax(head(out.hidden), dim=-1)[:, 0, 0] for head in self.models.lm.extra_heads]
            vad = torch.stack(heads, dim=1).float().tolist()
        return TextStep(out.tokens[:, 0, 0].tolist(), vad)

    @torch.no_grad()
    def step(self, pcm: np.ndarray) -> StepOutput:
        watch = _Stopwatch(self.device)
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
        watch = _Stopwatch(self.device)
        out = self.lm_step(self._codes)
        self._codes = None
        watch.lap("lm")
        return self._output(out, watch)

    def _output(self, out: TextStep, watch: _Stopwatch) -> StepOutput:
        token = out.tokens[0]
        return StepOutput(None, self.models.piece(token), watch.done(), token=token,
                          vad=out.vad[0] if out.vad else None)


def _start_encoder_process(info, num_codebooks: int, device: torch.device, batch_size: int) -> EncoderProcess:
    return EncoderProcess(info.mimi_weights, _mimi_config(info), num_codebooks, batch_size)
