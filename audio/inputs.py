"""The inputs of `moshi transcribe`, read block by block: audio files, standard input, raw PCM.

Every input yields 24 kHz mono float32 blocks and never holds more than one block, so an hour of
audio costs no more memory than a minute. Formats are those of ``audio.files.read_audio``.

Standard input: a WAV stream (what ``sox``, ``ffmpeg -f wav`` or ``arecord`` write to a pipe) is
decoded as it arrives; other formats need the whole stream before decoding starts (libsndfile
seeks), so they are first copied to a temporary file. ``--raw`` reads headerless 16-bit PCM.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import soundfile as sf

from . import SAMPLE_RATE
from .errors import AudioFileError
from .files import check_audio_path, check_rate, decode_error, warn_if_cut
from .resample import Resampler

BLOCK_SECONDS = 1.0
STDIN = "-"
_EMPTY_STDIN = "standard input is empty: no audio came in"


@dataclass
class AudioInput:
    name: str  # the path as given, or "-" for standard input
    open: Callable[[], Iterator[np.ndarray]]  # the 24 kHz mono blocks; called once, when transcription starts

    @property
    def stem(self) -> str:
        return "stdin" if self.name == STDIN else Path(self.name).stem


def file_input(path: str | Path) -> AudioInput:
    """A file checked now (so that a bad one fails before the model loads) and read later."""
    path = Path(path)
    _check_file(path)
    return AudioInput(str(path), lambda: _file_blocks(path))


def stdin_input(raw_rate: int | None = None, stream: BinaryIO | None = None) -> AudioInput:
    """Standard input: 16-bit little-endian mono PCM at ``raw_rate``, or any readable format."""
    source = stream or sys.stdin.buffer
    if raw_rate is not None:
        check_rate(raw_rate, "--rate")
        return AudioInput(STDIN, lambda: _to_24k(_raw_blocks(source, raw_rate), raw_rate))
    return AudioInput(STDIN, lambda: _stream_blocks(source))


def _check_file(path: Path) -> None:
    check_audio_path(path)
    warn_if_cut(path)
    with _open_soundfile(path, f"audio file {path}") as f:
        if f.frames == 0:
            raise AudioFileError(f"audio file has no samples: {path}")
        check_rate(f.samplerate, f"audio file {path}")


def _open_soundfile(file, name: str) -> sf.SoundFile:
    """``name``: what the messages call it ("audio file PATH", "standard input")."""
    try:
        with _quiet_stderr():  # libmpg123 prints its resync attempts on a broken MP3
            return _FrontToBackSoundFile(file)
    except (RuntimeError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise decode_error(exc, name) from exc


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what C libraries write to file descriptor 2 (Python's own stderr is left alone)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _FrontToBackSoundFile(sf.SoundFile):
    """soundfile moves the file position back into place after every read of a seekable file;
    that seek resets libsndfile's MP3 decoder, and MPEG-2 files (16 to 24 kHz) come out garbled
    from the second block on. Reading front to back needs no seek."""

    def seekable(self) -> bool:
        return False


def _file_blocks(file, name: str | None = None) -> Iterator[np.ndarray]:
    name = name or f"audio file {file}"
    with _open_soundfile(file, name) as f:
        rate, block = f.samplerate, np.empty((int(f.samplerate * BLOCK_SECONDS), f.channels), np.float32)

        def mono() -> Iterator[np.ndarray]:
            try:
                while len(data := f.read(len(block), always_2d=True, out=block)):
                    yield data.mean(axis=1)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioFileError(f"cannot decode {name}: {exc}") from exc

        yield from _to_24k(mono(), rate)


def _to_24k(blocks: Iterator[np.ndarray], rate: int) -> Iterator[np.ndarray]:
    """Resample a stream; the result equals ``audio.resample.resample`` of the whole signal."""
    if rate == SAMPLE_RATE:
        yield from (np.asarray(b, np.float32) for b in blocks)
        return
    r = Resampler(rate, SAMPLE_RATE)
    # The streaming filter is causal: it lags by half its length. A few leading zeros make that lag
    # a whole number of output samples, which are then dropped; zeros at the end flush it.
    half = r.taps * r.up // 2
    lead = next(k for k in range(r.down) if (half + k * r.up) % r.down == 0)
    to_skip = (half + lead * r.up) // r.down
    wanted = 0  # outputs the whole signal has so far: ceil(inputs * up / down)
    received = sent = 0

    def emit(out: np.ndarray) -> np.ndarray:
        nonlocal to_skip, sent
        dropped = min(to_skip, len(out))
        to_skip -= dropped
        out = out[dropped:dropped + max(0, wanted - sent)]
        sent += len(out)
        return out

    if lead:
        to_skip -= len(r.process(np.zeros(lead, np.float32)))
    for block in blocks:
        received += len(block)
        wanted = -(-received * r.up // r.down)
        yield emit(r.process(block))
    yield emit(r.process(np.zeros(r.taps, np.float32)))


def _raw_blocks(source: BinaryIO, rate: int) -> Iterator[np.ndarray]:
    size = int(rate * BLOCK_SECONDS) * 2
    leftover = b""
    while True:
        data = _read(source, size)
        if not data:
            return
        data = leftover + data
        whole = len(data) // 2 * 2
        leftover = data[whole:]
        yield np.frombuffer(data[:whole], "<i2").astype(np.float32) / 32768.0


def _read(source: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, as soon as some are there (a live pipe must not wait for a full block)."""
    read1 = getattr(source, "read1", None)
    return read1(size) if read1 is not None else source.read(size)


def _stream_blocks(source: BinaryIO) -> Iterator[np.ndarray]:
    if _seekable(source):  # redirected from a file
        start = source.tell()
        if source.seek(0, os.SEEK_END) == start:
            raise AudioFileError(_EMPTY_STDIN)
        source.seek(start)
        yield from _file_blocks(source, "standard input")
        return
    head = _read_exactly(source, 12)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        yield from _wav_stream(source)
        return
    # libsndfile must seek in these formats: keep the stream on disk, not in memory.
    with tempfile.TemporaryFile() as spool:
        spool.write(head)
        while chunk := source.read(1 << 20):
            spool.write(chunk)
        if spool.tell() == 0:
            raise AudioFileError(_EMPTY_STDIN)
        spool.seek(0)
        yield from _file_blocks(spool, "standard input")


def _seekable(source: BinaryIO) -> bool:
    try:
        return source.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = source.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE (the real tag starts its sub-format GUID)
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what writers put in the header when they cannot seek back


def _wav_stream(source: BinaryIO) -> Iterator[np.ndarray]:
    """Decode a WAV stream whose RIFF header (12 bytes) has been read, as its data arrives."""
    fmt = None
    while True:
        header = _read_exactly(source, 8)
        if len(header) < 8:
            raise AudioFileError("cannot decode standard input: the WAV stream ends before its audio data")
        chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
        if chunk_id == b"data":
            break
        body = _read_exactly(source, size + size % 2)
        if chunk_id == b"fmt ":
            fmt = body
    if fmt is None or len(fmt) < 16:
        raise AudioFileError("cannot decode standard input: the WAV stream has no format chunk before its data")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    dtype = {(_PCM, 8): "u1", (_PCM, 16): "<i2", (_PCM, 24): "i3", (_PCM, 32): "<i4",
             (_FLOAT, 32): "<f4", (_FLOAT, 64): "<f8"}.get((tag, bits))
    if dtype is None or channels == 0:
        raise AudioFileError(f"cannot decode standard input: WAV format {tag} with {bits}-bit samples is not "
                             "supported (use 8/16/24/32-bit PCM or float)")
    remaining = None if size in _UNKNOWN_SIZES else size
    frame_bytes = channels * bits // 8
    block_bytes = int(rate * BLOCK_SECONDS) * frame_bytes
    leftover = b""

    def blocks() -> Iterator[np.ndarray]:
        nonlocal remaining, leftover
        while remaining is None or remaining > 0:
            data = _read(source, block_bytes if remaining is None else min(block_bytes, remaining))
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            data = leftover + data
            whole = len(data) // frame_bytes * frame_bytes
            leftover = data[whole:]
            yield _pcm_to_float(data[:whole], dtype).reshape(-1, channels).mean(axis=1)

    yield from _to_24k(blocks(), rate)


def _pcm_to_float(data: bytes, dtype: str) -> np.ndarray:
    """Samples as float32 in [-1, 1], scaled as libsndfile scales them."""
    if dtype == "i3":
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3)
        ints = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8 | raw[:, 2].astype(np.int32) << 16)
        return (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    samples = np.frombuffer(data, dtype)
    if dtype == "u1":
        return (samples.astype(np.float32) - 128) / 128
    if dtype == "<i2":
        return samples.astype(np.float32) / 32768
    if dtype == "<i4":
        return (samples / float(1 << 31)).astype(np.float32)
    return samples.astype(np.float32)
