"""The engine process with a scripted runner loaded by dotted path in a real spawned child:
frames both ways, back-pressure, reset, and every way it can fail."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.interface import Failed, Loading, Output, Ready, WarmingUp
from engine.process import EngineProcess

from .processes import engine_children, gone
from .runners import PictureRunner, ScriptedRunner, ScriptOptions

RUNNER = f"{ScriptedRunner.__module__}:{ScriptedRunner.__qualname__}"
pytestmark = pytest.mark.timeout(60)


def poll_until(engine: EngineProcess, kind, timeout: float = 20.0) -> tuple[list, float]:
    """Events up to and including the first `kind`, and when it came."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        for event in engine.poll(timeout=0.05):
            seen.append(event)
            if isinstance(event, kind):
                return seen, time.monotonic()
    raise AssertionError(f"no {kind.__name__} within {timeout} s; got {seen}")


def start(log_path=None, **knobs) -> EngineProcess:
    return EngineProcess(RUNNER, ScriptOptions(**knobs), log_path=log_path)


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, 1920).astype(np.float32) for _ in range(n)]


def test_loads_then_answers_every_frame_in_order(tmp_path):
    log = tmp_path / "engine.log"
    with start(log_path=str(log)) as engine:
        events, _ = poll_until(engine, Ready)
        assert [e.detail for e in events if isinstance(e, Loading)] == ["part 1 of 3", "part 2 of 3", "part 3 of 3"]
        assert isinstance(events[-2], WarmingUp)
        assert events[-1].info == {"model": "scripted", "device": "cpu", "dtype": "float32"}
        sent = frames(12)
        outputs = []
        for pcm in sent:
            assert engine.send_frame(pcm)
            while engine.in_flight:
                outputs += [e for e in engine.poll(timeout=0.05) if isinstance(e, Output)]
        assert [o.index for o in outputs] == list(range(12))
        for pcm, out in zip(sent, outputs):
            np.testing.assert_array_equal(out.pcm, -0.5 * pcm)
        assert [o.text for o in outputs[:4]] == [None, " w1", None, " w3"]
        assert all(o.timings_ms["roundtrip"] >= o.timings_ms["total"] >= 0 for o in outputs)
        assert engine.skipped == 0
    assert engine.process.exitcode == 0  # left on "stop", not terminated
    assert log.read_text().splitlines() == ["scripted runner loaded", "stderr line"]


def test_a_slow_engine_never_blocks_the_sender_and_frames_are_skipped():
    with start(step_s=0.2) as engine:
        poll_until(engine, Ready)
        t0 = time.perf_counter()
        accepted = [engine.send_frame(pcm) for pcm in frames(10)]
        send_s = time.perf_counter() - t0
        assert accepted == [True] * engine.max_in_flight + [False] * (10 - engine.max_in_flight)
        assert engine.skipped == 10 - engine.max_in_flight
        assert send_s < 0.1
        outputs = []
        while len(outputs) < engine.max_in_flight:
            events = engine.poll(timeout=0.1)
            assert not any(isinstance(e, Failed) for e in events)
            outputs += [e for e in events if isinstance(e, Output)]
        assert engine.in_flight == 0 and engine.send_frame(frames(1)[0])


def test_a_model_slower_than_the_stall_timeout_is_late_not_stalled():
    """7B on a CPU takes seconds per step: it answers every frame, late, and must not be killed."""
    with start(step_s=1.2) as engine:
        poll_until(engine, Ready, timeout=30)
        assert engine.stall_timeout_s >= 10 * 1.2
        for pcm in frames(2):
            engine.send_frame(pcm)
        answers = []
        end = time.monotonic() + 10
        while len(answers) < 2 and time.monotonic() < end:
            events = engine.poll(timeout=0.1)
            assert not any(isinstance(e, Failed) for e in events), events
            answers += [e for e in events if isinstance(e, Output)]
        assert len(answers) == 2


def test_the_stall_timeout_follows_the_slowest_warm_step():
    """A chat with Mimi in its own process steps its LM from its second frame on: its first step
    says nothing of what the others take."""
    with start(step_s=1.2, quick_steps=2) as engine:
        poll_until(engine, Ready, timeout=30)
        assert engine.stall_timeout_s >= 10 * 1.2


def test_reset_drops_old_answers_and_counts_from_zero():
    with start(step_s=0.02) as engine:
        poll_until(engine, Ready)
        for pcm in frames(3):
            engine.send_frame(pcm)
        engine.reset()
        new = frames(3, seed=1)
        outputs, sent = [], 0
        while len(outputs) < 3:
            if sent < 3 and engine.send_frame(new[sent]):
                sent += 1
            outputs += [e for e in engine.poll(timeout=0.02) if isinstance(e, Output)]
        assert [o.index for o in outputs] == [0, 1, 2]
        np.testing.assert_array_equal(outputs[0].pcm, -0.5 * new[0])
        assert [o.text for o in outputs] == [None, " w1", None]  # the runner counts from 0 again


def test_a_load_error_arrives_as_one_line():
    with start(fail_load="model.safetensors is truncated") as engine:
        events, _ = poll_until(engine, Failed)
        assert events[-1].reason == "model.safetensors is truncated"
        assert "CheckpointError" in events[-1].detail
        assert engine.state == "failed" and not engine.process.is_alive()


def test_an_exception_in_step_names_itself():
    with start(raise_at=3) as engine:  # past the three warm steps (which come before a reset)
        poll_until(engine, Ready)
        for pcm in frames(4):
            engine.send_frame(pcm)
        events, _ = poll_until(engine, Failed)
        assert events[-1].reason == "ZeroDivisionError: division by zero"
        assert "Traceback" in events[-1].detail


@pytest.mark.parametrize(
    "knob, reason",
    [
        ("die_at", "the engine process was killed by SIGKILL"),
        ("hang_at", "the engine stalled: no answer to a frame for"),
        ("freeze_at", "the engine process stopped responding"),
    ],
)
def test_death_and_stalls_are_detected_within_a_second(knob, reason):
    engine = start(**{knob: 3})
    try:
        poll_until(engine, Ready)
        pid = engine.process.pid
        sent_at = []
        for pcm in frames(4):
            engine.send_frame(pcm)
            sent_at.append(time.monotonic())
        events, failed_at = poll_until(engine, Failed, timeout=5)
        assert events[-1].reason.startswith(reason)
        # Frame 3, sent last, is the one never answered: noticed within a second of sending it.
        assert failed_at - sent_at[3] < 1.0
        assert gone(pid)
        assert engine.poll() == []
    finally:
        if engine.process.is_alive():
            os.kill(engine.process.pid, signal.SIGCONT)
        engine.close()
    assert engine_children() == []


def test_close_while_loading_leaves_nothing_behind():
    engine = EngineProcess(RUNNER, ScriptOptions(load_steps=0, extra={}), log_path=None)
    engine.close(timeout=0.1)
    assert engine.state == "closed" and not engine.process.is_alive()
    assert engine_children() == []


def test_the_engine_leaves_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            f"sys.path[:0] = {sys.path!r}\n"
            "from engine.interface import Ready\n"
            "from engine.process import EngineProcess\n"
            f"from {ScriptedRunner.__module__} import ScriptOptions\n"
            f"e = EngineProcess({RUNNER!r}, ScriptOptions())\n"
            "while not any(isinstance(x, Ready) for x in e.poll(timeout=0.1)): pass\n"
            "print(e.process.pid, flush=True)\n"
            "time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait()
        end = time.monotonic() + 2
        while not gone(child) and time.monotonic() < end:
            time.sleep(0.02)
        assert gone(child)
    finally:
        parent.kill()


def test_an_unknown_runner_is_an_engine_error():
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="unknown engine runner 'nope'"):
        EngineProcess("nope", None)
    with start_failing("tests_nowhere.module:Runner") as engine:
        events, _ = poll_until(engine, Failed)
        assert events[-1].reason.startswith("cannot load the engine runner tests_nowhere.module:Runner")


def start_failing(path: str) -> EngineProcess:
    return EngineProcess(path, None)


PICTURE_RUNNER = f"{PictureRunner.__module__}:{PictureRunner.__qualname__}"


def _png(rgb) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(out, format="PNG")
    return out.getvalue()


def _answers(engine: EngineProcess, pcms) -> list[Output]:
    outputs = []
    for pcm in pcms:
        assert engine.send_frame(pcm)
        while engine.in_flight:
            events = engine.poll(timeout=0.05)
            assert not any(isinstance(e, Failed) for e in events), events
            outputs += [e for e in events if isinstance(e, Output)]
    return outputs


def test_outputs_carry_the_gate_and_a_new_image_starts_a_new_conversation():
    with EngineProcess(PICTURE_RUNNER, ScriptOptions(step_s=0.05)) as engine:
        poll_until(engine, Ready)
        assert {o.gate for o in _answers(engine, frames(3))} == {0.0}
        for pcm in frames(3):  # in flight when the picture changes: their answers are dropped
            engine.send_frame(pcm)
        engine.set_image(_png((255, 0, 0)), "red.png")
        after = _answers(engine, frames(4, seed=1))
        assert [o.index for o in after] == [0, 1, 2, 3]
        assert [o.text for o in after] == [None, " w1", None, " w3"]  # the runner counts from 0 again
        assert all(o.gate == pytest.approx(0.1, abs=1e-3) for o in after)  # red 255 / 2550
    with start() as engine:  # a runner without a picture has no gate
        poll_until(engine, Ready)
        assert [o.gate for o in _answers(engine, frames(2))] == [None, None]


@pytest.mark.parametrize("runner, image, reason", [
    (RUNNER, _png((0, 0, 0)), "ScriptedRunner cannot look at pictures"),
    (PICTURE_RUNNER, b"GIF89a but not really", "the image is not a picture"),
])
def test_a_picture_the_engine_cannot_use_is_a_named_failure(runner, image, reason):
    with EngineProcess(runner, ScriptOptions()) as engine:
        poll_until(engine, Ready)
        engine.set_image(image, "x")
        [failed], _ = poll_until(engine, Failed)
        assert failed.reason.startswith(reason)
    assert engine_children() == []
