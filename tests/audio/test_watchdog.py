"""When a sound device counts as gone: no first callback within STARTUP_S of the start, or no
callback for SILENT_DEVICE_S while the reader waits for frames."""

from audio.duplex import SILENT_DEVICE_S, STARTUP_S, device_failure


def test_a_device_that_never_starts():
    assert device_failure(STARTUP_S - 1, 0.0, None, None) is None
    assert device_failure(STARTUP_S + 1, 0.0, None, 2.0) == f"did not start within {STARTUP_S:.0f} s"


def test_a_gap_before_the_first_read_is_no_failure():
    # A callback at once on open, then none while the model loads; the reader comes at 8 s.
    assert device_failure(10.4, 0.0, 0.1, 8.0) is None
    assert device_failure(8.0 + SILENT_DEVICE_S + 0.1, 0.0, 0.1, 8.0) == f"sent no audio for {SILENT_DEVICE_S:.0f} s"


def test_silence_counts_from_the_last_callback_once_reading():
    assert device_failure(14.0, 0.0, 10.0, 1.0) is None
    assert device_failure(10.0 + SILENT_DEVICE_S + 0.1, 0.0, 10.0, 1.0) is not None
