"""What every benchmark reports: medians of ours and the reference, and their ratio."""

from __future__ import annotations

import statistics


def summary(ours_ms: list[float], reference_ms: list[float]) -> dict[str, float]:
    ours, reference = statistics.median(ours_ms), statistics.median(reference_ms)
    return {"ours_ms": round(ours, 2), "reference_ms": round(reference, 2), "ratio": round(ours / reference, 3)}
