"""Audio tests: every one runs under a timeout (a wedged PortAudio stream must fail, not hang),
and ``pulse`` gives them a private PulseAudio server whose null sink loops back to the input."""

import os

import pytest

from pulse import ENV_KEYS, PulseUnavailable, start_pulse

AUDIO_TEST_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/audio/" in str(item.fspath).replace("\\", "/") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(AUDIO_TEST_TIMEOUT_S))


@pytest.fixture
def pulse():
    """A fresh server for each test (one that served many streams drifts and glitches under load;
    starting one takes 50-120 ms), made PortAudio's default input and
    output. Skips, with the reason, if it cannot start."""
    try:
        server = start_pulse()
    except PulseUnavailable as exc:
        pytest.skip(f"no PulseAudio server for real audio: {exc}")
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update({k: server.env[k] for k in ENV_KEYS})
    from audio.devices import refresh

    refresh()  # PortAudio lists devices when it starts; it may have started before the server
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
    refresh()
