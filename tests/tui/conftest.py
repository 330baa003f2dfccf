"""Fixtures of the TUI tests: tiny random checkpoints, and a private PulseAudio server."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random checkpoint folders in the official layout, by kind."""
    from engine.tiny import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_checkpoint(base / kind, kind, seed=0) for kind in ("chat", "transcribe")}


def _pulse_helper():
    path = Path(__file__).resolve().parents[1] / "audio" / "pulse.py"  # the audio tests' helper
    spec = importlib.util.spec_from_file_location("pulse_helper", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pulse():
    """A private PulseAudio server, made PortAudio's default: its null sink loops back to the
    default input. Skips, with the reason, where it cannot start."""
    helper = _pulse_helper()
    try:
        server = helper.start_pulse()
    except helper.PulseUnavailable as exc:
        pytest.skip(f"no PulseAudio server for real audio: {exc}")
    saved = {k: os.environ.get(k) for k in helper.ENV_KEYS}
    os.environ.update({k: server.env[k] for k in helper.ENV_KEYS})
    from audio.devices import refresh

    refresh()  # PortAudio lists devices when it starts, maybe before this server
    yield server
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()
    refresh()


@pytest.fixture(scope="session")
def sun_picture(tmp_path_factory):
    """A 4:3 JPEG: a yellow sun in a blue sky over green grass."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (30, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([200, 100, 440, 340], fill=(250, 210, 40))
    draw.rectangle([0, 380, 640, 480], fill=(40, 160, 60))
    path = tmp_path_factory.mktemp("pictures") / "sun.jpg"
    image.save(path, quality=90)
    return path


@pytest.fixture
def one_thread_engine(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a spawned engine reads it when torch starts
