"""`moshi transcribe`: streaming speech recognition with Kyutai STT."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DeviceOption, DtypeOption, HfRepo, Seed, model_options, progress_to_stderr

EPILOG = """\
Examples:

\b
  moshi transcribe talk.mp3                       # words to stdout as they come
  moshi transcribe --hf-repo stt-2.6b-en talk.wav # the larger English model
"""


def register(app: typer.Typer) -> None:
    app.command(short_help="Transcribe speech as it is spoken.", epilog=EPILOG)(transcribe)


def transcribe(
    file: Annotated[Optional[Path], typer.Argument(
        metavar="[FILE]", help="Audio file to transcribe (wav, flac, ogg or mp3, any rate).")] = None,
    hf_repo: HfRepo = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "bfloat16",
    seed: Seed = None,
) -> None:
    """Transcribe speech with Kyutai STT, printing words as the model recognises them."""
    options = model_options(hf_repo, device, dtype, seed, None, None, None, None)
    if file is None:
        raise typer.BadParameter("live transcription needs the TUI, which is not wired yet; give a FILE",
                                 param_hint="FILE")
    run_headless_transcribe(file, options)


def run_headless_transcribe(file: Path, options) -> None:
    import numpy as np

    from audio.files import read_audio
    from engine.runner import FRAME_SIZE, SAMPLE_RATE, TranscribeRunner

    pcm = read_audio(file)
    runner = TranscribeRunner.load(options, progress=progress_to_stderr)
    # As Kyutai's `moshi-inference`: the checkpoint's silence prefix, then delay + 1 s of silence
    # so that the words still in flight (the model lags the audio by its delay) come out.
    prefix = np.zeros(int(runner.silence_prefix_seconds * SAMPLE_RATE), dtype=np.float32)
    suffix = np.zeros(int((runner.delay_seconds + 1.0) * SAMPLE_RATE), dtype=np.float32)
    padded = np.concatenate([prefix, pcm, suffix])
    for start in range(0, len(padded) - FRAME_SIZE + 1, FRAME_SIZE):
        out = runner.step(padded[start:start + FRAME_SIZE])
        if out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
