"""The benchmark scripts run (in their quick mode) and report every figure with its ratio.

Timings are not asserted: they depend on the machine. What is checked is that the scripts still
work and that each ratio is consistent with the two times it is computed from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moshi")
ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmarks_report_ours_and_reference():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"mimi_encode", "mimi_decode", "stt1b_step_bf16"} <= set(figures)
    for name, figure in figures.items():
        assert figure["ours_ms"] > 0 and figure["reference_ms"] > 0, name
        assert figure["ratio"] == pytest.approx(figure["ours_ms"] / figure["reference_ms"], rel=0.02), name
