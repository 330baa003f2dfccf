import os

import numpy as np
import pytest
import soundfile as sf

from audio import FRAME_SIZE, SAMPLE_RATE
from audio.core import DuplexConfig, DuplexCore
from audio.errors import AudioFileError
from audio.meters import LevelMeter, VoiceActivity, level_db
from sim import BLOCK, Simulation


def speechy(seed=0, level=0.05, on_s=2.0, period_s=5.0, offset_s=0.0):
    """Noise bursts with a syllable rhythm: a stand-in for a talker."""
    rng = np.random.default_rng(seed)

    def source(start, n):
        t = (start + np.arange(n)) / SAMPLE_RATE + offset_s
        envelope = ((t % period_s) < on_s) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        return (rng.standard_normal(n) * level * envelope).astype(np.float32)

    return source


def test_frames_carry_their_capture_time():
    core = DuplexCore(DuplexConfig(aec=False))
    frames = []
    for k in range(8):
        core.playback(BLOCK, 1.0 + k * 0.02)
        core.capture(np.full(BLOCK, k, np.float32), 0.5 + k * 0.02, 1.0 + k * 0.02)
        core.process_captured()
        frames.append(core.read_frame(1.0 + k * 0.02))
    first, second = [f for f in frames if f is not None]
    assert first.captured_at == pytest.approx(0.5) and second.captured_at == pytest.approx(0.58)
    assert first.available_at == pytest.approx(1.06)
    assert np.array_equal(first.pcm, np.repeat(np.arange(4, dtype=np.float32), BLOCK))
    assert core.read_frame(1.15) is None and core.skipped_input_frames == 0


def test_stale_frames_are_skipped_and_counted():
    core = DuplexCore(DuplexConfig(aec=False, max_input_age_ms=40))
    for k in range(12):  # three frames, ready at 0.08, 0.16 and 0.24 s
        core.capture(np.zeros(BLOCK, np.float32), k * 0.02, (k + 1) * 0.02)
    core.process_captured()
    frame = core.read_frame(0.25)
    assert frame.available_at == pytest.approx(0.24)
    assert core.skipped_input_frames == 2


def test_recording_holds_the_user_and_what_was_playing(tmp_path):
    """A pure echo (gain 1, no acoustic delay, AEC off): the microphone hears exactly what the
    speaker plays, so once the stream timestamps have aligned the two, the channels are equal."""
    core = DuplexCore(DuplexConfig(aec=False))
    core.start_recording(tmp_path / "talk.wav")
    sim = Simulation(core, step_s=lambda t: 0.05, echo_gain=1.0, input_latency_s=0.03, output_latency_s=0.05)
    sim.run(3.0)
    core.stop_recording()
    data, rate = sf.read(tmp_path / "talk.wav", dtype="float32")
    assert rate == SAMPLE_RATE and len(data) == (int(3.0 * SAMPLE_RATE) // FRAME_SIZE) * FRAME_SIZE
    aligned = slice(SAMPLE_RATE, None)  # the offset is known after the first callbacks
    assert np.abs(data[aligned, 1]).max() > 0.05  # something played
    assert np.abs(data[aligned, 0] - data[aligned, 1]).max() <= 2 / 32767


def test_recording_that_fails_stops_without_stopping_the_conversation(tmp_path):
    core = DuplexCore(DuplexConfig(aec=False))
    core.start_recording(tmp_path / "r.wav")
    sim = Simulation(core, step_s=lambda t: 0.05, mic=speechy())
    sim.run(0.5)
    os.close(core._recorder._file.fileno())  # the file goes away under the writer
    sim.run(0.5)
    stats = core.stats()
    assert stats.recording is None and "cannot write recording" in stats.recording_error
    sim.run(0.5)
    assert core.stats().lag_ms is not None  # still talking


def test_recording_to_an_unwritable_place_is_refused_up_front(tmp_path):
    core = DuplexCore(DuplexConfig(aec=False))
    with pytest.raises(AudioFileError, match="cannot write recording"):
        core.start_recording(tmp_path / "no-such-dir" / "r.wav")
    assert core.stats().recording is None


def test_echo_is_cancelled_through_the_core_with_device_latency():
    core = DuplexCore(DuplexConfig(aec=True))
    sim = Simulation(core, step_s=lambda t: 0.06, mic=speechy(level=0.0), echo_gain=0.5, echo_delay_s=0.005,
                     input_latency_s=0.03, output_latency_s=0.05)
    heard = []
    sim.on_frame = heard.append
    sim.run(10.0)
    stats = core.stats()
    assert stats.roundtrip_ms == pytest.approx(100, abs=1)  # 30 + 50 ms + one 20 ms block
    assert stats.echo_delay_ms == pytest.approx(5, abs=1)
    # The model's own voice comes back at about -10 dB; the model must not hear it.
    played_db = np.mean([level_db(f) for f in list(sim.answers)[-25:]])
    heard_db = np.mean([level_db(f.pcm) for f in heard[-25:]])
    assert played_db - 6 - heard_db > 30, (played_db, heard_db)
    assert stats.erle_db > 25


def test_echo_cancellation_recovers_when_the_device_latency_changes():
    core = DuplexCore(DuplexConfig(aec=True))
    sim = Simulation(core, step_s=lambda t: 0.06, echo_gain=0.5, echo_delay_s=0.005,
                     input_latency_s=0.03, output_latency_s=0.05)
    heard = []
    sim.on_frame = heard.append
    sim.run(8.0)
    sim.output_latency_s = 0.15  # e.g. the sound server grew its buffer
    sim.run(8.0)
    assert core.stats().roundtrip_ms == pytest.approx(200, abs=1)
    played_db = np.mean([level_db(f) for f in list(sim.answers)[-25:]])
    heard_db = np.mean([level_db(f.pcm) for f in heard[-25:]])
    assert played_db - 6 - heard_db > 25, (played_db, heard_db)


def test_meters_and_voice_activity_follow_the_user():
    core = DuplexCore(DuplexConfig(aec=False))
    sim = Simulation(core, step_s=lambda t: 0.06, mic=speechy(level=0.05, on_s=2.0, period_s=4.0))
    voice = []
    for _ in range(400):
        sim.run(0.02)
        voice.append((sim.now % 4.0, core.stats().voice, core.stats().input_db))
    talking = [v for t, v, _ in voice if 0.3 < t < 1.9]
    silent = [v for t, v, _ in voice if 2.6 < t < 3.9]
    assert np.mean(talking) > 0.95 and np.mean(silent) < 0.05
    assert np.mean([db for t, _, db in voice if 0.3 < t < 1.9]) == pytest.approx(-30, abs=4)


def test_level_meter_rises_at_once_and_falls_slowly():
    meter = LevelMeter(release_db_per_s=30)
    loud = np.full(480, 0.5, np.float32)
    assert meter.update(loud, 0.02) == pytest.approx(-6.0, abs=0.1)
    assert meter.update(np.zeros(480, np.float32), 0.1) == pytest.approx(-9.0, abs=0.1)
    vad = VoiceActivity()
    assert not vad.update(np.full(480, 1e-4, np.float32), 0.02)
