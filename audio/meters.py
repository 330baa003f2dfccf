"""Level meters and an energy voice-activity flag for the UI."""

from __future__ import annotations

import math

import numpy as np

SILENCE_DB = -100.0


def level_db(pcm: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale sine is -3 dB)."""
    power = float(np.dot(pcm, pcm)) / max(len(pcm), 1)
    return max(SILENCE_DB, 10 * math.log10(power + 1e-20))


class LevelMeter:
    """Rises at once, falls at ``release_db_per_s``: readable at a 10-20 Hz UI refresh."""

    def __init__(self, release_db_per_s: float = 30.0):
        self.release = release_db_per_s
        self.db = SILENCE_DB

    def update(self, pcm: np.ndarray, seconds: float) -> float:
        self.db = max(level_db(pcm), self.db - self.release * seconds)
        return self.db


class VoiceActivity:
    """Voice when the level stands ``margin_db`` above the tracked noise floor (and above
    ``min_db``), held for ``hangover_s`` so that gaps between words do not flicker."""

    def __init__(self, margin_db: float = 12.0, min_db: float = -50.0, floor_rise_db_per_s: float = 3.0,
                 hangover_s: float = 0.3):
        self.margin, self.min_db, self.rise, self.hangover = margin_db, min_db, floor_rise_db_per_s, hangover_s
        self.floor = -70.0
        self.active = False
        self._since_voice = math.inf

    def update(self, pcm: np.ndarray, seconds: float) -> bool:
        db = level_db(pcm)
        # The floor follows quiet moments at once and climbs slowly through speech.
        self.floor = db if db < self.floor else self.floor + self.rise * seconds
        if db > max(self.floor + self.margin, self.min_db):
            self._since_voice = 0.0
        else:
            self._since_voice += seconds
        self.active = self._since_voice <= self.hangover
        return self.active
