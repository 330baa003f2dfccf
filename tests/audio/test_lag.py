"""Bounded lag, driven by a simulated engine through the same buffering and AEC code as a device."""

import gc

import numpy as np
import pytest

from audio import FRAME_SIZE, SAMPLE_RATE
from audio.core import DuplexConfig, DuplexCore

from sim import Simulation


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("realtime_step_s", [0.060, 0.080])
def test_lag_stays_bounded_while_the_engine_is_slow_and_recovers(realtime_step_s):
    core = DuplexCore(DuplexConfig(aec=True))
    # Real time for 3 s, then 1.5x slower than real time for 10 s, then real time again.
    sim = Simulation(core, step_s=lambda t: 0.120 if 3 <= t < 13 else realtime_step_s)
    sim.run(17.0)
    times, lags_ms = np.array(sim.lag_times), np.array(sim.lags) * 1000
    slow = (times >= 3) & (times < 13.2)
    after = times >= 15.0  # within 2 s of catching up
    print(f"\nreal-time step {realtime_step_s * 1000:.0f} ms: lag before {lags_ms[times < 3].max():.0f} ms, "
          f"slow max {lags_ms[slow].max():.0f} ms (median {np.median(lags_ms[slow]):.0f}), "
          f"after {lags_ms[after].max():.0f} ms; skipped {core.skipped_input_frames}, "
          f"underruns {core.jitter.underruns}, dropped {core.jitter.dropped_frames:.2f} frames")
    assert lags_ms.max() <= 300
    assert lags_ms[after].max() <= 200
    # The model kept up by skipping stale microphone frames, and they are all accounted for.
    frames_captured = int(sim.now * SAMPLE_RATE) // FRAME_SIZE
    assert core.skipped_input_frames >= 0.25 * 10 / 0.080  # about a third of the slow frames
    assert core.skipped_input_frames + sim.frames_read + len(core._frames) == frames_captured
    assert core.jitter.underruns > 0  # 80 ms of answer every 120 ms cannot play without gaps


def test_bursts_from_the_engine_are_dropped_and_counted():
    core = DuplexCore(DuplexConfig(aec=False))
    # A remote engine that stalls for 400 ms every 5 s, then delivers what it owes at once.
    sim = Simulation(core, step_s=lambda t: 0.400 if (t % 5) < 0.07 else 0.060)
    sim.run(20.0)
    times, lags = np.array(sim.lag_times), np.array(sim.lags)
    assert core.jitter.dropped_frames > 0
    assert lags[times > 2].max() * 1000 <= 300 + 400  # a stall shows once, then the lag recovers
    assert np.median(lags) * 1000 <= 200


def test_thirty_minute_conversation_neither_lags_nor_grows():
    """30 minutes with echo cancellation, a user who talks, device latencies and an engine with
    an occasional late step. The jitter buffer's budgets settle within minutes (they grow with
    underruns and relax after quiet spells); after that the lag must not creep and memory must
    stay flat."""
    core = DuplexCore(DuplexConfig(aec=True))
    rng = np.random.default_rng(0)

    def user(start, n):  # bursts of noisy "speech", 2 s in every 7
        t = (start + np.arange(n)) / SAMPLE_RATE
        return (rng.standard_normal(n) * 0.05 * ((t % 7) < 2)).astype(np.float32)

    def step(t):  # a real-time engine, late now and then
        return 0.150 if rng.random() < 0.003 else float(rng.uniform(0.04, 0.075))

    sim = Simulation(core, step_s=step, mic=user, echo_gain=0.4, echo_delay_s=0.004,
                     input_latency_s=0.03, output_latency_s=0.05)
    windows = []
    for minute in range(30):
        start = len(sim.lags)
        sim.run(60.0)
        if minute == 4:
            gc.collect()
            memory_at_5_min = rss_mb() - _arrays_mb(sim)
        lags = np.array(sim.lags[start:]) * 1000
        windows.append((np.median(lags), np.percentile(lags, 99), lags.max()))
    gc.collect()
    growth = rss_mb() - _arrays_mb(sim) - memory_at_5_min
    early, late = np.array(windows[5:10]), np.array(windows[25:30])
    print(f"\n30 min: lag median/p99/max, minutes 5-10 {early.mean(0).round()} ms, minutes 25-30 "
          f"{late.mean(0).round()} ms, worst minute max {np.array(windows)[:, 2].max():.0f} ms; "
          f"memory {growth:+.1f} MB from minute 5 to 30; skipped {core.skipped_input_frames}, "
          f"dropped {core.jitter.dropped_frames:.1f} frames, underruns {core.jitter.underruns}, "
          f"ERLE estimate {core.stats().erle_db:.0f} dB")
    assert late[:, 0].mean() <= early[:, 0].mean() + 20
    assert late[:, 1].mean() <= early[:, 1].mean() + 20
    # Device latency (80 ms) included: a late step (150 ms) shows, but nothing accumulates.
    assert np.array(windows)[:, 2].max() <= 300 + 80 + 70
    assert growth < 3
    assert len(core._frames) <= 2 and core.jitter.buffered <= (80 + 80 + 80) * SAMPLE_RATE // 1000


def _arrays_mb(sim: Simulation) -> float:
    """What the simulation's own lag log holds (it grows by design)."""
    return (len(sim.lags) + len(sim.lag_times)) * 8 / 2**20
