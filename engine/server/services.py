"""Which service a checkpoint is served by: the endpoint follows the model."""

from __future__ import annotations

from typing import Callable

from ..errors import EngineError
from ..hub import CheckpointInfo
from ..options import Mode, ModelOptions
from ..runner import Progress, load_models
from .app import Service


def mode_of(repo: str) -> Mode:
    """A checkpoint's mode from its configuration: MoshiVis has a "moshivis" section (the official
    repo, without config.json, is named so), speech recognition no depth transformer."""
    info = CheckpointInfo.resolve(repo)
    if (info.raw_config or {}).get("moshivis") is not None or (info.raw_config is None and "-vis" in str(repo)):
        return Mode.SEE
    if info.lm_config.get("dep_q", 8) == 0:
        return Mode.TRANSCRIBE
    return Mode.CHAT


def _chat(options: ModelOptions, batch_size: int, progress: Progress | None) -> Service:
    from .chat import ChatService

    models = load_models(options, Mode.CHAT.default_model, progress)
    return ChatService(models, batch_size, vision=False)


def _see(options: ModelOptions, batch_size: int, progress: Progress | None) -> Service:
    from ..moshivis.runner import load_see_models
    from .chat import ChatService

    return ChatService(load_see_models(options, progress), batch_size, vision=True)


def _transcribe(options: ModelOptions, batch_size: int, progress: Progress | None) -> Service:
    from ..stt.runner import TranscribeRunner
    from .asr import AsrService

    return AsrService(TranscribeRunner.load(options, progress, batch_size))


# How each mode is served.
SERVICES: dict[Mode, Callable[[ModelOptions, int, Progress | None], Service]] = {
    Mode.CHAT: _chat,
    Mode.SEE: _see,
    Mode.TRANSCRIBE: _transcribe,
}


def load_service(options: ModelOptions, batch_size: int, progress: Progress | None = None) -> Service:
    mode = mode_of(options.hf_repo or Mode.CHAT.default_model)
    if mode not in SERVICES:
        raise EngineError(f"`moshi serve` cannot serve {mode.value} models yet")
    return SERVICES[mode](options, batch_size, progress)
