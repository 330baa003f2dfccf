"""Reading audio files (wav, flac, ogg, mp3, at any rate) as 24 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from . import SAMPLE_RATE
from .errors import AudioFileError
from .resample import resample

FORMATS = "wav, flac, ogg (vorbis or opus) or mp3"


def read_audio(path: str | Path) -> np.ndarray:
    """The whole file, channels averaged, resampled to 24 kHz, as a float32 array in [-1, 1]."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioFileError(f"{path} is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioFileError(f"audio file is empty (0 bytes): {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        detail = exc.error_string.removeprefix("Error :").strip().rstrip(".")
        if not detail or exc.code in (1, 2):  # libsndfile gives no reason for "unknown format"
            detail = f"not a readable {FORMATS} file"
        raise AudioFileError(f"cannot decode audio file {path}: {detail}") from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        raise AudioFileError(f"cannot decode audio file {path}: {exc}") from exc
    if len(data) == 0:
        raise AudioFileError(f"audio file has no samples: {path}")
    return resample(data.mean(axis=1), rate, SAMPLE_RATE)
