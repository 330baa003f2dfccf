import numpy as np
import pytest

from audio import FRAME_SIZE, SAMPLE_RATE
from audio.jitter import JitterBuffer, JitterConfig

BLOCK = 480
MS = SAMPLE_RATE // 1000


def frame(k, freq=217.3):  # not a divisor of any block size: seams are never at a zero
    """Frame k of one continuous sine, so that any seam shows as a jump."""
    t = np.arange(k * FRAME_SIZE, (k + 1) * FRAME_SIZE) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


MAX_SINE_STEP = 0.5 * 2 * np.pi * 217.3 / SAMPLE_RATE  # the largest step the sine itself takes


def test_starts_after_one_frame_and_the_partial_wait():
    jb = JitterBuffer()
    jb.push(frame(0)[:1000], None, 0.0)
    assert not jb.started and not jb.pull(BLOCK, 0.0).any()
    jb.push(frame(0)[1000:], None, 0.0)
    assert jb.started
    out = np.concatenate([jb.pull(BLOCK, 0.0) for _ in range(4)])
    silence = 10 * MS  # the initial partial budget
    assert not out[:silence].any()
    assert np.allclose(out[silence + 5 * MS:], frame(0)[5 * MS:len(out) - silence], atol=1e-6)  # after the fade-in


def test_drops_oldest_audio_beyond_the_budget_and_grows_it():
    jb = JitterBuffer()
    pushes = 0
    for k in range(40):  # a burst: frames arrive with nothing pulled in between
        jb.push(frame(k), None, k * 0.001)
        pushes += FRAME_SIZE
        # Never more than initial + partial + max, which starts at 100 ms and caps at 240 ms.
        assert jb.buffered <= (80 + 10 + 80) * MS + FRAME_SIZE
    assert jb.dropped_samples > 0
    assert jb.dropped_samples == pushes - jb.buffered
    assert jb.max == 80 * MS  # grew by 5 ms per drop up to its cap
    assert jb.dropped_frames == pytest.approx(jb.dropped_samples / FRAME_SIZE)


def test_underrun_grows_the_partial_budget_when_the_producer_keeps_time():
    jb = JitterBuffer()
    now = 0.0
    for k in range(20):
        jb.push(frame(k), None, now)
        n_pulls = 4 if k % 5 else 5  # every fifth frame arrives 20 ms late
        for _ in range(n_pulls):
            jb.pull(BLOCK, now)
            now += BLOCK / SAMPLE_RATE
    assert jb.underruns >= 3
    assert jb.partial > 10 * MS


def test_underruns_from_a_slow_producer_do_not_add_lag():
    jb = JitterBuffer()
    now = 0.0
    for k in range(30):  # 80 ms of audio every 120 ms: no buffer can fix that
        jb.push(frame(k), None, now)
        for _ in range(6):
            jb.pull(BLOCK, now)
            now += BLOCK / SAMPLE_RATE
    assert jb.underruns >= 25
    assert jb.partial <= 15 * MS  # at most the first underrun, before the rate was known


def test_no_clicks_through_drops_and_underruns():
    rng = np.random.default_rng(0)
    jb = JitterBuffer()
    out, now, k = [], 0.0, 0
    for _ in range(2000):
        if rng.random() < 0.27:  # bursty arrivals: about 1.08 frames per 4 blocks
            for _ in range(rng.integers(1, 4)):
                jb.push(frame(k), None, now)
                k += 1
        out.append(jb.pull(BLOCK, now))
        now += BLOCK / SAMPLE_RATE
    out = np.concatenate(out)
    assert jb.underruns > 10 and jb.dropped_samples > 0
    # Fades are 5 ms long, so no step is much larger than the sine's own.
    assert np.abs(np.diff(out)).max() < 2.5 * MAX_SINE_STEP


def test_lag_is_measured_from_the_tag():
    jb = JitterBuffer()
    jb.push(frame(0), 10.0, 10.2)  # answers microphone audio captured at t = 10 s
    jb.pull(BLOCK, 10.25)  # 10 ms partial silence, then the frame's first sample
    assert jb.last_lag == pytest.approx(0.26)
    jb.pull(BLOCK, 10.27)  # the next block starts 470 samples into the frame
    assert jb.last_lag == pytest.approx(0.26)


def test_reset_restores_the_initial_budgets():
    jb = JitterBuffer(JitterConfig())
    for k in range(30):
        jb.push(frame(k), None, 0.0)
    jb.reset()
    assert (jb.buffered, jb.max, jb.partial, jb.dropped_samples) == (0, 10 * MS, 10 * MS, 0)
