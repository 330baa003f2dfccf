import numpy as np
import pytest

import audio.speex as speex
from audio.errors import AudioError, EchoCancellerError
from audio.speex import SpeexEcho, SpeexPreprocessor


def test_cancels_a_pure_delay_echo():
    rng = np.random.default_rng(0)
    far = (rng.standard_normal(24000 * 4) * 3000).astype(np.int16)
    echo = np.concatenate([np.zeros(100, np.int16), far[:-100] // 2])
    aec = SpeexEcho(480, 2400, 24000)
    out = np.concatenate([aec.cancel(echo[i:i + 480], far[i:i + 480]) for i in range(0, len(far), 480)])
    last = slice(-24000, None)
    erle = 10 * np.log10(np.mean(echo[last].astype(float) ** 2) / np.mean(out[last].astype(float) ** 2))
    assert erle > 20
    peak = int(np.argmax(np.abs(aec.impulse_response())))
    assert peak == 100  # the filter found the echo where it is


def test_length_is_checked_not_read_past():
    aec = SpeexEcho(480, 2400, 24000)
    with pytest.raises(ValueError, match="480"):
        aec.cancel(np.zeros(10, np.int16), np.zeros(480, np.int16))
    with pytest.raises(ValueError, match="480"):
        SpeexPreprocessor(480, 24000, aec).run(np.zeros(479, np.int16))


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setattr(speex, "_lib", None)
    monkeypatch.setattr(speex.ctypes.util, "find_library", lambda name: "libspeexdsp-not-here.so.9")
    with pytest.raises(EchoCancellerError, match="libspeexdsp1.*--no-aec") as info:
        SpeexEcho(480, 2400, 24000)
    assert isinstance(info.value, AudioError)
