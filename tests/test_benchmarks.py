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
    assert "machine: " in result.stderr and "int8: " in result.stderr  # what the figures were measured on
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"mimi_encode", "mimi_decode", "stt1b_step_bf16", "stt1b_step_int8", "stt1b_step_int4",
            "moshi7b_depformer_step", "stt1b_peak_rss_int8", "stt1b_logit_error_int8"} <= set(figures)
    assert any(name.startswith("transcribe_rtf_") for name in figures)
    assert {"serve_stt_streams_realtime", "serve_stt_rtf_1", "serve_stt_p95_word_latency_ms_1"} <= set(figures)
    for name, figure in figures.items():
        if "relative_error" in figure:  # a quantized model's logits against bf16
            assert 0 < figure["relative_error"] < 1, name
            continue
        unit = next(key[len("ours_"):] for key in figure if key.startswith("ours_"))  # ms, mb, rtf or streams
        if name.startswith("serve_stt_"):  # no reference: Kyutai has no Python STT server
            assert figure[f"ours_{unit}"] >= 0, name
            continue
        ours, reference = figure[f"ours_{unit}"], figure[f"reference_{unit}"]
        assert ours > 0 and reference > 0, name
        assert figure["ratio"] == pytest.approx(ours / reference, rel=0.02), name
