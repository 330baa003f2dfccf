"""`moshi doctor` on this machine: with a sound server it passes, without one it says what is missing;
its pipeline check runs a tiny model through the real engine process."""

import os
import socket
import subprocess

import pytest

from .test_terminal import MOSHI

pytestmark = pytest.mark.timeout(300)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doctor(env):
    env = {**env, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    return subprocess.run([*MOSHI, "doctor"], capture_output=True, text=True, env=env, timeout=240)


def test_doctor_passes_with_a_sound_server(pulse):
    result = _doctor({**os.environ, **pulse.env})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("[ok  ] microphone:") for line in lines)
    assert any(line.startswith("[ok  ] speakers:") for line in lines)
    assert any("Hub not reachable at http://127.0.0.1:" in line for line in lines)
    # Which int8 kernel runs depends on the CPU; each names its library.
    [kernels] = [line for line in lines if line.startswith("[ok  ] CPU kernels: ")]
    assert any(f"--quantize int8 runs {name}" in kernels for name in ("native kernels' int8 path", "oneDNN",
                                                                     "weight-only int8"))
    [pipeline] = [line for line in lines if "pipeline:" in line]
    # A live chat steps frame 0 as Kyutai's server does and answers it with silence; with Mimi in its
    # own process (a CPU with 2 cores or more) the answers come two frames later, so the last two
    # frames' answers are not back after 25 steps: every other frame has a voice.
    voiced = 22 if "(Mimi: own process)" in pipeline else 24
    assert pipeline.startswith("[ok  ] pipeline: 25 frames") and f"{voiced} answered with audio" in pipeline


def test_doctor_fails_without_audio_devices(tmp_path):
    # No sound server reachable: PortAudio finds no usable device.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path), PULSE_SERVER=f"unix:{tmp_path}/none")
    result = _doctor(env)
    assert result.returncode == 1
    assert "[FAIL] microphone: no device" in result.stdout


def _run_check(check, *args):
    from moshi_tui.commands import doctor

    return getattr(doctor, check)(*args)


def test_too_little_memory_is_a_failure(monkeypatch, capsys):
    from moshi_tui.commands import doctor

    monkeypatch.setattr(doctor, "_available_memory_gb", lambda: 3.0)
    assert _run_check("_check_torch", "moshika") == 1
    assert "[FAIL] moshika needs about 18 GB of memory, 3.0 GB is available" in capsys.readouterr().out


def test_available_memory_is_memavailable():
    from moshi_tui.commands.doctor import _available_memory_gb

    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":") for line in meminfo)
    assert _available_memory_gb() == int(fields["MemAvailable"].split()[0]) * 1024 / 1e9


def test_a_pipeline_slower_than_real_time_fails_saying_what_to_do(capsys):
    assert _run_check("_pipeline_line", 95.0, 25, "in the engine") == 1
    out = capsys.readouterr().out
    assert out.startswith("[FAIL] pipeline:") and "slower than real time" in out and "--quantize int8" in out
    assert _run_check("_pipeline_line", 12.0, 25, "in the engine") == 0


def test_an_unknown_model_name_fails(capsys):
    assert _run_check("_check_model", "moshikaa") == 1
    assert capsys.readouterr().out.startswith("[FAIL] unknown model 'moshikaa'")
    assert _run_check("_check_model", "stt-1b-en_fr") == 0
