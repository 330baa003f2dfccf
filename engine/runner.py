"""Frame-by-frame runners: the one interface between the models and everything that feeds them
(the headless commands, the engine process behind the TUI).

A runner takes one frame of the user's audio (``audio.FRAME_SIZE`` float32 samples, 80 ms) per
call and returns what the model produced for that frame. It keeps Mimi and the LM in streaming
mode for its whole life; ``reset()`` starts a new conversation with the same weights.

Here is what every runner shares: the seam (``Runner``, ``PictureRunner``, ``StepOutput``), the
models of a checkpoint (``Models``, ``load_models``) and ``BaseRunner``. The runners themselves are
the families': ``moshi/runner.py``, ``moshivis/runner.py``, ``stt/runner.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from audio import FRAME_SIZE

from .encoder import EncoderProcess, InlineEncoder
from .errors import EngineError
from .formats.transformers import JsonTokenizer
from .mimi.loading import load_checkpoint_mimi
from .moshi.generate import LMGen, Sampling
from .moshi.loading import load_checkpoint_lm
from .moshi.model import LMConfig, LMModel
from .moshi.tokens import Tokenizer, text_piece
from .options import ModelOptions
from .quant import exact_activations, quantization_of

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

# Seed of Kyutai's `moshi-inference`, so that sampled runs can be compared with it.
DEFAULT_SEED = 4242

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

Progress = Callable[[str], None]


@dataclass
class StepOutput:
    pcm: np.ndarray | None  # FRAME_SIZE samples of Moshi's voice for this frame; None before its first frame
    text: str | None  # the text piece of this frame, None for padding
    timings_ms: dict[str, float]
    token: int | None = None  # the raw text token (None before the first frame)
    vad: list[float] | None = None  # STT with VAD heads: P(pause) over 0.5, 1, 2, 3 s
    gate: float | None = None  # MoshiVis: how much Moshi looked at the picture (mean gate, ~0.02 to ~0.1)
    user_text: str | None = None  # chat with a user STT: the user's text piece of this frame
    late: int = 0  # the text and user_text are of the frame this many steps back (Mimi in its own process: 2)


class Runner(Protocol):
    """What the engine process (its child side) and the headless commands use of a runner."""

    frame_size: int  # samples a step takes: FRAME_SIZE

    @classmethod
    def load(cls, options: Any, progress: Progress | None = None) -> Runner:
        """Load the model ``options`` names (a ``ModelOptions``, or the runner's own subclass of it),
        telling ``progress`` each stage."""

    def warmup(self) -> None:
        """Run a few frames of silence, then reset: the first real frame is then as fast as the others."""

    def step(self, pcm: np.ndarray) -> StepOutput:
        """Answer one frame of the user's voice (FRAME_SIZE float32 samples)."""

    def reset(self) -> None:
        """Start a new conversation with the same weights."""

    def describe(self) -> dict[str, str]:
        """What runs, for display: model, device, dtype, quantization, ..."""

    def close(self) -> None:
        """Release what lives outside this process (Mimi's encoder process)."""


@runtime_checkable
class PictureRunner(Runner, Protocol):
    """A runner that talks about a picture (MoshiVis)."""

    def set_image(self, picture: Image.Image, name: str = "") -> None:
        """Look at this RGB picture from now on, in a new conversation."""


class FirstFrame(Enum):
    """What a conversation runner does about the user's first frame. The LM's first step reads only
    its initial tokens, whatever codes it is given, so frame 0 is never heard as it is; each of
    Kyutai's tools makes up for it in its own way, and whoever builds a runner picks the tool it
    stands beside."""

    # moshi's run_inference.py, for file runs (`moshi chat --input`, `moshi transcribe`): frame 0's
    # codes are fed to the LM twice, so that step 1 hears frame 0, and N frames in give N answers.
    RUN_INFERENCE = "run_inference"
    # moshi's server.py, for live sessions (what the engine process loads): frame 0 is encoded and
    # stepped once, then Mimi starts over, so that frame 1 is encoded with fresh left padding, as if
    # it were the first; step 1 hears frame 1.
    SERVER = "server"
    # MoshiVis's server (kyuteye/server.py), for `moshi see`: every frame is encoded once and
    # stepped once, Mimi going on; step 1 hears frame 1.
    KYUTEYE_SERVER = "kyuteye_server"


@dataclass
class Models:
    name: str
    mimi: torch.nn.Module
    lm: LMModel
    model: torch.nn.Module  # what the checkpoint holds: the LMModel, or a model wrapping it (MoshiVis)
    tokenizer: Tokenizer  # sentencepiece's, or a transformers checkpoint's tokenizer.json
    sampling: Sampling
    stt_config: dict = field(default_factory=dict)
    quantize: str | None = None  # "int8" (a q8 checkpoint, or --quantize) or "int4"

    def piece(self, token: int) -> str | None:
        """The text of a token as the reference prints it, or None for a special token."""
        return text_piece(self.tokenizer, token)


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but PyTorch sees no CUDA GPU (try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EngineError("--device mps was asked for, but MPS is not available here (try --device cpu)")
    return device


def _load_tokenizer(path: Path) -> Tokenizer:
    """A SentencePiece model, or the tokenizer.json of a transformers checkpoint."""
    import sentencepiece

    if path.suffix == ".json":
        return JsonTokenizer(path)
    tokenizer = sentencepiece.SentencePieceProcessor()
    try:
        loaded = tokenizer.Load(str(path))
    except (OSError, RuntimeError) as exc:  # a file that is not a sentencepiece model
        raise EngineError(f"cannot read the text tokenizer {path}: {str(exc).splitlines()[0]}") from None
    if not loaded:
        raise EngineError(f"cannot read the text tokenizer {path}")
    return tokenizer


def load_models(options: ModelOptions, default_repo: str, progress: Progress | None = None,
                load_language_model: Callable = load_checkpoint_lm, default_sampling: Sampling | None = None,
                load_codec: Callable = load_checkpoint_mimi) -> Models:
    """Resolve the checkpoint, then load Mimi, the LM and the tokenizer onto the device.

    ``load_language_model(info, device, dtype, quantize)`` returns the LMModel, or a model wrapping
    one as ``.lm`` (MoshiVis); ``default_sampling`` applies where the checkpoint's lm_gen_config is
    silent; ``load_codec(info, num_codebooks, device, exact)`` returns Mimi, or an ``EncoderProcess`` that
    runs it (started first, so that it loads while the LM does).
    """
    from .hub import CheckpointInfo

    report = progress or (lambda message: None)
    if options.dtype not in DTYPES:
        raise EngineError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    device = _resolve_device(options.device)
    repo = options.hf_repo or default_repo
    report(f"resolving {repo}")
    info = CheckpointInfo.resolve(repo)

    lm_config = LMConfig.from_dict(info.lm_config)  # checked before anything is allocated
    tokenizer = _load_tokenizer(info.tokenizer)
    report("loading Mimi")
    mimi = load_codec(info, max(lm_config.dep_q, lm_config.n_q - lm_config.dep_q), device, options.exact)
    report("loading the language model" + (f" ({options.quantize})" if options.quantize else ""))
    try:
        model = load_language_model(info, device, DTYPES[options.dtype], options.quantize)
    except BaseException:
        if isinstance(mimi, EncoderProcess):
            mimi.close()  # it was loading beside the LM
        raise
    lm = getattr(model, "lm", model)
    if options.exact:
        exact_activations(model)

    defaults = (default_sampling or Sampling()).__dict__
    gen_config = {**defaults, **{k: v for k, v in info.lm_gen_config.items() if k in defaults}}
    for key in defaults:
        if getattr(options, key) is not None:
            gen_config[key] = getattr(options, key)
    torch.manual_seed(DEFAULT_SEED if options.seed is None else options.seed)
    return Models(name=repo, mimi=mimi, lm=lm, model=model, tokenizer=tokenizer,
                  sampling=Sampling(**gen_config), stt_config=dict(info.stt_config), quantize=quantization_of(lm))


class Stopwatch:
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


class BaseRunner:
    """Mimi and the LM streaming together; a family's runner adds ``load`` and ``step``."""

    frame_size = FRAME_SIZE

    def __init__(self, models: Models, first_frame: FirstFrame, batch_size: int = 1):
        self.models = models
        self.first_frame = first_frame
        self.gen = LMGen(models.lm, models.sampling)
        self.device = models.lm.device
        self.batch_size = batch_size
        mimi = models.mimi
        self.encoder = mimi if isinstance(mimi, EncoderProcess) else InlineEncoder(mimi, self.device, batch_size)
        self.gen.start_streaming(batch_size)
        self._at_first_frame = True

    def describe(self) -> dict[str, str]:
        return {"model": self.models.name, "device": str(self.device), "dtype": str(self.models.lm.dtype).split(".")[-1],
                "quantize": self.models.quantize or "none", "steps": self.gen.acceleration}

    def reset(self) -> None:
        self.encoder.reset()
        self.gen.reset_streaming()
        self._at_first_frame = True

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

    def submit(self, pcm: np.ndarray | None, decode: torch.Tensor | None = None) -> None:
        """Start encoding one frame per slot ([batch_size, FRAME_SIZE]); ``collect`` gives the codes.
        ``decode``: audio tokens for an ``EncoderProcess`` to decode as well (``pcm`` None: only that)."""
        if decode is not None:
            self.encoder.submit(None if pcm is None else self._frames(pcm), decode=decode)
        else:
            self.encoder.submit(self._frames(pcm))

    def _frames(self, pcm: np.ndarray) -> np.ndarray:
        if pcm.shape != (FRAME_SIZE,) and pcm.shape != (self.batch_size, FRAME_SIZE):
            raise ValueError(f"a frame is {FRAME_SIZE} samples per slot, got shape {pcm.shape}")
        return pcm.reshape(self.batch_size, FRAME_SIZE)

    def _lm_step(self, codes: torch.Tensor):
        """One LM step on the codes of the frame just encoded, after what ``first_frame`` asks for."""
        if self._at_first_frame:
            self._at_first_frame = False
            if self.first_frame is FirstFrame.RUN_INFERENCE:
                self.gen.step_full(codes)
            elif self.first_frame is FirstFrame.SERVER:
                self.encoder.reset()
        return self.gen.step_full(codes)
