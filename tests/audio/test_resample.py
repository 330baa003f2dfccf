import numpy as np
import pytest

from audio.resample import Resampler, resample

RATES = [(48000, 24000), (44100, 24000), (22050, 24000), (16000, 24000), (24000, 48000), (24000, 44100)]


def tone(freq, rate, seconds=1.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def snr_db(ref, got):
    return 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2))


@pytest.mark.parametrize("in_rate,out_rate", RATES)
def test_in_band_tones_come_out_exact_and_in_time(in_rate, out_rate):
    freqs = [220.0, 1000.0, 3150.0, 6000.0]  # below 90 % of 8 kHz, the lowest Nyquist here
    x = sum(tone(f, in_rate, amp=0.2) for f in freqs)
    y = resample(x, in_rate, out_rate)
    assert len(y) == int(np.ceil(len(x) * out_rate / in_rate))
    expected = sum(tone(f, out_rate, amp=0.2) for f in freqs)[: len(y)]
    edge = out_rate // 20  # the ends see the zero padding
    assert snr_db(expected[edge:-edge], y[edge:-edge]) > 80


@pytest.mark.parametrize("in_rate", [48000, 44100, 96000])
def test_no_aliasing_from_above_the_output_band(in_rate):
    # Tones between 12 kHz and the input Nyquist would fold to audible frequencies if not filtered.
    for freq in (12500.0, 15000.0, 20000.0):
        y = resample(tone(freq, in_rate), in_rate, 24000)
        level_db = 20 * np.log10(np.sqrt(np.mean(y[2400:-2400] ** 2)) / (0.5 / np.sqrt(2)))
        assert level_db < -70, (freq, level_db)


@pytest.mark.parametrize("in_rate,out_rate", RATES)
def test_streaming_in_odd_blocks_matches_whole_signal(in_rate, out_rate):
    x = np.random.default_rng(1).standard_normal(in_rate).astype(np.float32) * 0.1
    r = Resampler(in_rate, out_rate)
    rng = np.random.default_rng(2)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 2000))
        expected_count = r.output_count(len(x[i:i + n]))
        parts.append(r.process(x[i:i + n]))
        assert len(parts[-1]) == expected_count
        i += n
    streamed = np.concatenate(parts)
    assert np.allclose(streamed, Resampler(in_rate, out_rate).process(x), atol=1e-6)


@pytest.mark.parametrize("in_rate,out_rate", RATES)
def test_streaming_lags_by_its_stated_delay(in_rate, out_rate):
    r = Resampler(in_rate, out_rate)
    y = np.concatenate([r.process(block) for block in np.split(tone(1000, in_rate), 50)])
    t = np.arange(len(y)) / out_rate - r.delay / in_rate
    expected = 0.5 * np.sin(2 * np.pi * 1000 * t)
    assert snr_db(expected[out_rate // 10:], y[out_rate // 10:]) > 80


def test_fixed_blocks_give_a_fixed_output_size():
    # 20 ms device blocks at 44.1 kHz must become exactly 480 samples at 24 kHz, every time.
    r = Resampler(44100, 24000)
    sizes = {len(r.process(np.zeros(882, np.float32))) for _ in range(200)}
    assert sizes == {480}
