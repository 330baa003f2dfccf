"""What the CLI tells the engine: the mode and the model to run. Importing this is cheap (no
torch), so the app's process uses it too."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    """What a session does. Everything that differs between the modes is in ``MODES``."""

    CHAT = "chat"
    SEE = "see"
    TRANSCRIBE = "transcribe"

    @property
    def spec(self) -> ModeSpec:
        return MODES[self]

    @property
    def talks(self) -> bool:
        return MODES[self].talks

    @property
    def default_model(self) -> str:
        return MODES[self].default_model

    @property
    def runner(self) -> str:
        return MODES[self].runner


@dataclass(frozen=True)
class ModeSpec:
    default_model: str  # a name from the models table, used when --hf-repo is not given
    runner: str  # the engine runner, "module:Class", loaded in the engine process
    talks: bool  # Moshi answers with its voice (else the session only listens)


MODES = {
    Mode.CHAT: ModeSpec("moshika", "engine.moshi.runner:ChatRunner", talks=True),
    Mode.SEE: ModeSpec("moshika-vis", "engine.moshivis.runner:SeeRunner", talks=True),
    Mode.TRANSCRIBE: ModeSpec("stt-1b-en_fr", "engine.stt.runner:TranscribeRunner", talks=False),
}


@dataclass
class ModelOptions:
    """None means "what the checkpoint says" (its ``lm_gen_config``, else the reference defaults)."""

    hf_repo: str | None = None  # model name ("moshika"), repo id, or local folder
    device: str = "cpu"
    dtype: str = "bfloat16"
    quantize: str | None = None  # "int8" | "int4": the LM's linears, at load time (a q8 checkpoint is int8 anyway)
    # Mimi encodes with the reference's own kernels (codes bit-identical) rather than, on a CPU,
    # faster ones that now and then flip a codeword near-tie (engine/mimi/model.py)
    exact: bool = False
    seed: int | None = None
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    # chat: the STT model that writes the user's words ("off", or "auto": stt-1b-en_fr where the
    # warm step allows it and it is cached; engine/stt/user.py)
    user_stt: str | None = None


@dataclass
class SeeOptions(ModelOptions):
    """MoshiVis: the model options plus the picture and how the model looks at it."""

    image: str | None = None  # the picture's path
    xa_start: int | None = None  # steps before Moshi looks at the picture; None: the checkpoint's (16)
