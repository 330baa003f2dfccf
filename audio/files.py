"""Reading audio files (wav, flac, ogg, mp3, at any rate) as 24 kHz mono float32."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from . import SAMPLE_RATE
from .errors import AudioFileError
from .resample import resample

FORMATS = "wav, flac, ogg (vorbis or opus) or mp3"
# The sample rates of sound: resampling a file that declares 8 Hz to 24 kHz would ask for 3000 times its size.
MIN_RATE, MAX_RATE = 1_000, 768_000


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


def check_rate(rate: int, name: str) -> None:
    """A named error unless ``rate`` is the sample rate of sound; ``name`` is what the message calls the input."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFileError(f"{name} declares a sample rate of {rate} Hz: moshi reads {MIN_RATE // 1000} kHz "
                             f"to {MAX_RATE // 1000} kHz")


def warn_if_cut(path: Path) -> None:
    """One line on stderr when ``path`` is a WAV file whose audio data ends before the size its
    header declares (a copy or a recording cut short): what is there is still read."""
    if _wav_cut_short(path):
        print(f"moshi: warning: {path} is cut short: its audio data ends before the length its header "
              "declares; reading what is there", file=sys.stderr, flush=True)


def _wav_cut_short(path: Path) -> bool:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return False
        position = 12
        while position + 8 <= size:
            f.seek(position)
            tag, length = struct.unpack("<4sI", f.read(8))
            if tag == b"data":
                # 0 and 0xFFFFFFFF: a stream's writer that never knew the length
                return length not in (0, 0xFFFFFFFF) and position + 8 + length > size
            position += 8 + length + (length & 1)
    return False


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
    warn_if_cut(path)
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            check_rate(rate, f"audio file {path}")  # before anything is read
            data = f.read(dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise decode_error(exc, f"audio file {path}") from exc
    if len(data) == 0:
        raise AudioFileError(f"audio file has no samples: {path}")
    return resample(data.mean(axis=1), rate, SAMPLE_RATE)
