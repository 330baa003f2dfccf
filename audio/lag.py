"""Every knob that bounds the lag of a live conversation, in one place.

Lag is how long after the user speaks Moshi's answer to it plays. It can grow in three queues, and
each has a bound past which audio gives way (is skipped or dropped) rather than wait:

1. Microphone → session (``audio/core.py``, ``DuplexCore.read_frame``): a captured frame older
   than ``MAX_INPUT_AGE_MS`` when the session asks for one is skipped, so after a stall the model
   hears the present, not a backlog. Counted as the audio layer's ``skipped_input_frames``.
2. Session → model (``engine/process.py``, ``EngineProcess.send_frame``; any ``Engine``): at most
   ``MAX_IN_FLIGHT_FRAMES`` frames sent and not yet answered. A model slower than real time gets
   every later frame refused (counted as the engine's ``skipped``) instead of an ever longer queue.
3. Model → speaker (``audio/jitter.py``, ``JitterBuffer``): the playback buffer follows the rule of
   Kyutai's web client, with the budgets in ``JitterConfig``: playback starts once ``initial_ms``
   + ``partial_ms`` are queued; past ``initial + partial + max`` the oldest audio is dropped down
   to ``initial + partial``; underruns and drops grow ``partial``/``max`` by ``step_ms`` up to
   ``cap_ms``, and ``relax_s`` without one shrinks them again.

The session shows the resulting lag (microphone capture to speaker) and these counters live.
"""

from __future__ import annotations

from dataclasses import dataclass

# 1. Half a frame: a frame is read at most this long after it was complete.
MAX_INPUT_AGE_MS = 40.0
# 2. About 0.3 s of audio: enough to ride out a slow step, more would only add lag.
MAX_IN_FLIGHT_FRAMES = 4


# 3.
@dataclass
class JitterConfig:
    initial_ms: float = 80.0  # one frame queued before playback starts
    partial_ms: float = 10.0  # ... plus this much, grown by underruns
    max_ms: float = 10.0  # queued beyond initial + partial before the oldest audio is dropped, grown by drops
    step_ms: float = 5.0  # how much an underrun or a drop grows its budget, and a quiet spell shrinks it
    cap_ms: float = 80.0  # the most either budget grows to
    relax_s: float = 10.0  # a budget this long without the event that grew it shrinks by one step
