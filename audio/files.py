"""Reading audio files (wav, flac, ogg, mp3, at any rate) as 24 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from . import SAMPLE_RATE
from .errors import AudioFileError
from .resample import resample

FORMATS = "wav, flac, ogg (vorbis or opus) or mp3"


# libsndfile's codes for "unknown format", and for an MP3 it cannot sync to, which it words as a
# missing file (the input is there: it was opened or checked before).
_NOT_AUDIO_CODES = (1, 2, 7)


def check_audio_path(path: Path) -> None:
    """A named error unless ``path`` is a non-empty file (whether it decodes is not checked)."""
    if not path.exists():
        raise AudioFileError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioFileError(f"{path} is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioFileError(f"audio file is empty (0 bytes): {path}")


def decode_error(exc: Exception, name: str) -> AudioFileError:
    """The error for an input soundfile cannot open; ``name`` is what the message calls it
    ("audio file PATH", "standard input")."""
    detail = str(exc)
    if isinstance(exc, sf.LibsndfileError):
        detail = exc.error_string.removeprefix("Error :").strip().rstrip(".")
        if not detail or exc.code in _NOT_AUDIO_CODES:
            detail = f"not a readable {FORMATS} file"
    return AudioFileError(f"cannot decode {name}: {detail}")


def read_audio(path: str | Path) -> np.ndarray:
    """The whole file, channels averaged, resampled to 24 kHz, as a float32 array in [-1, 1]."""
    path = Path(path)
    check_audio_path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise decode_error(exc, f"audio file {path}") from exc
    if len(data) == 0:
        raise AudioFileError(f"audio file has no samples: {path}")
    return resample(data.mean(axis=1), rate, SAMPLE_RATE)
