"""A WAV writer whose file is valid at every moment: the header is rewritten after each block.

Writes go straight to the file descriptor (no user-space buffer), so if the process dies the file
holds every block whose write returned; at most the block being written is lost. The file is
created new (`outputs.open_new`): a symlink at its name is replaced, never written through.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .errors import AudioFileError
from .outputs import open_new

_HEADER_SIZE = 44
_MAX_DATA = 0xFFFFFFFF - (_HEADER_SIZE - 8)  # RIFF sizes are 32-bit


class WavWriter:
    """16-bit PCM, interleaved channels. ``write(ch0, ch1, ...)`` takes one float array per channel."""

    def __init__(self, path: str | Path, sample_rate: int, channels: int = 2, mode: int = 0o666):
        """`mode`: the new file's permissions, filtered by the umask (0o600: private)."""
        self.path = Path(path)
        self.sample_rate, self.channels = sample_rate, channels
        self.frames_written = 0
        self._data_bytes = 0
        try:
            self._file = os.fdopen(open_new(self.path, mode), "wb", buffering=0)
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            self._file.write(self._header())
        except OSError as exc:
            self._file.close()
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> AudioFileError:
        return AudioFileError(f"cannot write recording {self.path}: {exc.strerror or exc}")

    def _header(self) -> bytes:
        block_align = 2 * self.channels
        return struct.pack(
            "<4sI4s4sIHHIIHH4sI",
            b"RIFF", _HEADER_SIZE - 8 + self._data_bytes, b"WAVE",
            b"fmt ", 16, 1, self.channels, self.sample_rate, self.sample_rate * block_align, block_align, 16,
            b"data", self._data_bytes,
        )

    def write(self, *channels: np.ndarray) -> None:
        if len(channels) != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {len(channels)}")
        samples = np.stack([np.asarray(c, np.float32).reshape(-1) for c in channels], axis=1)
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        if self._data_bytes + len(pcm) > _MAX_DATA:
            raise AudioFileError(f"recording {self.path} reached the 4 GiB limit of the WAV format")
        try:
            self._file.write(pcm)
            self._data_bytes += len(pcm)
            # Sizes last: until they are rewritten the file simply ends before this block.
            os.pwrite(self._file.fileno(), struct.pack("<I", _HEADER_SIZE - 8 + self._data_bytes), 4)
            os.pwrite(self._file.fileno(), struct.pack("<I", self._data_bytes), 40)
        except OSError as exc:
            raise self._error(exc) from exc
        self.frames_written += len(samples)

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as exc:
                raise self._error(exc) from exc

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
