"""Audio tests: every one runs under a timeout (a wedged PortAudio stream must fail, not hang)."""

import pytest

AUDIO_TEST_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/audio/" in str(item.fspath).replace("\\", "/") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(AUDIO_TEST_TIMEOUT_S))
