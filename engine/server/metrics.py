"""The Prometheus metrics every service keeps, in a registry of its own (one per server)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A model step is 80 ms of audio: the buckets resolve around that budget.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.4, 1.0)


class ServiceMetrics:
    def __init__(self, free_slots: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.sessions = Gauge("moshi_sessions", "Conversations open now", registry=self.registry)
        self.connections = Counter("moshi_connections", "Websocket sessions accepted", registry=self.registry)
        self.refused = Counter("moshi_refused", "Sessions refused because every slot was taken",
                               registry=self.registry)
        Gauge("moshi_free_slots", "Slots free for a new conversation",
              registry=self.registry).set_function(free_slots)
        self.step_seconds = Histogram("moshi_step_seconds", "Wall time of one batched model step",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.frames = Counter("moshi_frames", "Frames stepped, over all sessions", registry=self.registry)
        self.frames_dropped = Counter("moshi_frames_dropped", "Frames dropped because a client was too slow",
                                      registry=self.registry)
        self.holds = Counter("moshi_holds", "Steps a conversation sat out, its client's next audio not there yet",
                             registry=self.registry)
        self.errors = Counter("moshi_errors", "Sessions ended by an error (bad message, model failure)",
                              registry=self.registry)
