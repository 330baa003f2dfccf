"""Block-by-block inputs of `moshi transcribe` give exactly what the whole-file reader gives:
every format and rate, and standard input through a real pipe (WAV decoded as it arrives,
other formats spooled to disk first)."""

import os
import threading

import numpy as np
import pytest
import soundfile

from audio.files import read_audio
from audio.inputs import file_input, stdin_input
from transcribe_support import noise

# (extension, rate, channels, subtype): MP3 at 16 and 22.05 kHz is MPEG-2, which libsndfile garbles
# after the first block if anything seeks between reads.
CASES = [
    ("wav", 44100, 2, "PCM_24"),
    ("wav", 8000, 1, "PCM_U8"),
    ("wav", 24000, 1, "FLOAT"),
    ("flac", 16000, 1, None),
    ("ogg", 22050, 2, None),
    ("mp3", 16000, 1, None),
    ("mp3", 22050, 1, None),
    ("mp3", 44100, 2, None),
]


def _write(tmp_path, ext, rate, channels, subtype, seconds=3.7):
    pcm = np.stack([noise(seconds, rate, seed=c) for c in range(channels)], axis=1)
    path = tmp_path / f"in-{rate}-{channels}.{ext}"
    soundfile.write(path, pcm, rate, subtype=subtype)
    return path


def _read(audio_input):
    return np.concatenate(list(audio_input.open()))


@pytest.mark.parametrize("ext, rate, channels, subtype", CASES)
def test_file_blocks_equal_whole_file(tmp_path, ext, rate, channels, subtype):
    path = _write(tmp_path, ext, rate, channels, subtype)
    whole = read_audio(path)
    blocks = _read(file_input(path))
    assert blocks.dtype == np.float32 and len(blocks) == len(whole)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-6)


def _through_pipe(path, **kwargs):
    """The file's bytes written into an OS pipe by another thread, read as standard input."""
    read_fd, write_fd = os.pipe()
    data = path.read_bytes()

    def feed():
        try:
            with os.fdopen(write_fd, "wb") as pipe:
                for i in range(0, len(data), 4093):
                    pipe.write(data[i:i + 4093])
                    pipe.flush()
        except BrokenPipeError:
            pass  # the reader gave up on a stream it cannot decode

    writer = threading.Thread(target=feed)
    writer.start()
    with os.fdopen(read_fd, "rb") as stream:
        out = _read(stdin_input(stream=stream, **kwargs))
    writer.join()
    return out


@pytest.mark.parametrize("ext, rate, channels, subtype", CASES)
def test_pipe_equals_file(tmp_path, ext, rate, channels, subtype):
    path = _write(tmp_path, ext, rate, channels, subtype)
    np.testing.assert_allclose(_through_pipe(path), read_audio(path), rtol=0, atol=1e-6)


def test_raw_pcm_pipe_equals_the_same_samples_in_a_wav(tmp_path):
    wav = _write(tmp_path, "wav", 16000, 1, "PCM_16")
    samples, _ = soundfile.read(wav, dtype="int16")
    raw = tmp_path / "in.raw"
    raw.write_bytes(samples.astype("<i2").tobytes() + b"\x01")  # a stray last byte is no sample
    np.testing.assert_array_equal(_through_pipe(raw, raw_rate=16000), read_audio(wav))


def test_wav_stream_with_an_unsupported_encoding_is_named(tmp_path):
    path = _write(tmp_path, "wav", 16000, 1, "ULAW")
    from audio.errors import AudioFileError

    with pytest.raises(AudioFileError, match="WAV format 7 with 8-bit samples is not supported"):
        _through_pipe(path)
