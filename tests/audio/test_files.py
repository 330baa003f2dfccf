import numpy as np
import pytest
import soundfile as sf

from audio import SAMPLE_RATE
from audio.errors import AudioError, AudioFileError
from audio.files import read_audio


def chord(rate, seconds=1.5):
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)


@pytest.mark.parametrize(
    "name,rate,subtype,tol_db",
    [
        ("a.wav", 48000, "PCM_16", 60),
        ("b.wav", 44100, "FLOAT", 80),
        ("c.flac", 22050, "PCM_24", 70),
        ("d.wav", 24000, "PCM_16", 80),
    ],
)
def test_lossless_files_come_back_at_24k(tmp_path, name, rate, subtype, tol_db):
    x = chord(rate)
    stereo = np.stack([x, x], axis=1)  # stereo on disk, mono out
    sf.write(tmp_path / name, stereo, rate, subtype=subtype)
    y = read_audio(tmp_path / name)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 1.5 * SAMPLE_RATE) <= 1
    ref = chord(SAMPLE_RATE)[: len(y)]
    s = slice(1200, -1200)
    snr = 10 * np.log10(np.sum(ref[s] ** 2) / np.sum((y[s] - ref[s]) ** 2))
    assert snr > tol_db


@pytest.mark.parametrize("name,fmt,subtype", [("e.ogg", "OGG", "VORBIS"), ("f.mp3", "MP3", "MPEG_LAYER_III"),
                                              ("g.opus", "OGG", "OPUS")])
def test_lossy_files_decode_to_the_same_tones(tmp_path, name, fmt, subtype):
    rate = 48000
    sf.write(tmp_path / name, chord(rate, 2.0), rate, format=fmt, subtype=subtype)
    y = read_audio(tmp_path / name)
    assert abs(len(y) / SAMPLE_RATE - 2.0) < 0.1
    spectrum = np.abs(np.fft.rfft(y[4800:-4800] * np.hanning(len(y) - 9600)))
    freqs = np.fft.rfftfreq(len(y) - 9600, 1 / SAMPLE_RATE)
    top_two = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert abs(top_two[0] - 440) < 3 and abs(top_two[1] - 1250) < 3
    # Nothing but the two tones: the codec's noise is far below them.
    mask = (np.abs(freqs - 440) > 20) & (np.abs(freqs - 1250) > 20)
    assert np.sum(spectrum[mask] ** 2) / np.sum(spectrum**2) < 1e-2


def test_missing_file(tmp_path):
    with pytest.raises(AudioFileError, match="not found") as info:
        read_audio(tmp_path / "nope.wav")
    assert "nope.wav" in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioFileError, match="empty"):
        read_audio(tmp_path / "empty.wav")


def test_file_with_no_samples(tmp_path):
    sf.write(tmp_path / "z.wav", np.zeros((0, 1), np.float32), 24000)
    with pytest.raises(AudioFileError, match="no samples"):
        read_audio(tmp_path / "z.wav")


def test_not_audio(tmp_path):
    (tmp_path / "notes.mp3").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="cannot decode audio file .*notes.mp3"):
        read_audio(tmp_path / "notes.mp3")


def test_truncated_flac(tmp_path):
    sf.write(tmp_path / "t.flac", chord(24000, 3.0), 24000)
    data = (tmp_path / "t.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[:40])
    with pytest.raises(AudioFileError, match="cannot decode audio file .*cut.flac"):
        read_audio(tmp_path / "cut.flac")


def test_directory(tmp_path):
    with pytest.raises(AudioFileError, match="directory"):
        read_audio(tmp_path)


def test_a_wav_cut_short_is_read_with_one_warning(tmp_path, capsys):
    path = tmp_path / "cut.wav"
    sf.write(path, np.full(SAMPLE_RATE, 0.25, np.float32), SAMPLE_RATE, subtype="PCM_16")
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    pcm = read_audio(path)
    assert 0.45 * SAMPLE_RATE < len(pcm) < 0.55 * SAMPLE_RATE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"moshi: warning: {path} is cut short" in err
    path.write_bytes(whole)
    read_audio(path)
    assert capsys.readouterr().err == ""
