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
    assert {"mimi_encode", "mimi_decode", "mimi_encode_fast", "mimi_decode_fast", "mimi_codec", "mimi_codec_fast",
            "stt1b_step_bf16", "stt1b_step_int8", "stt1b_step_int4",
            "moshi7b_depformer_step", "stt1b_peak_rss_int8", "stt1b_logit_error_int8", "q8_0_old_layer_7b_m8",
            "candle_q8_load", "candle_q8_peak_rss", "candle_q8_logit_error"} <= set(figures)
    assert any(name.startswith("transcribe_rtf_") for name in figures)
    added = figures["chat_url_added_latency_ms"]  # --url over loopback against the in-process engine
    assert added["added_ms"] == pytest.approx(added["ours_ms"] - added["reference_ms"], abs=0.02)
    assert {"moshi7b_depformer_step_int4", "moshi7b_step_int8", "moshi7b_step_int4"} <= set(figures)
    bandwidth = figures.pop("bandwidth_gbs")
    assert bandwidth["one_thread_gbs"] > 0 and bandwidth["all_threads_gbs"] > 0 and bandwidth["threads"] >= 1
    for mode in ("bf16", "int8", "int4", "q8_0", "int8_exact", "int4_exact", "q8_0_exact"):  # against their floor
        step = figures[f"moshi7b_step_{mode}"]
        assert step["floor_ms"] == pytest.approx(step["gb_per_step"] / step["bandwidth_gbs"] * 1000, rel=0.02)
        assert step["floor_ratio"] == pytest.approx(step["ours_ms"] / step["floor_ms"], rel=0.02)
    assert figures["moshi7b_step_int4"]["gb_per_step"] < 0.6 * figures["moshi7b_step_int8"]["gb_per_step"]
    for mode in ("bf16", "int8", "int4"):  # a live chat with Mimi in its own process, against one process
        chat = figures.pop(f"chat_rtf_{mode}")
        assert chat["ours_rtf"] > 0 and chat["lm_ms"] > 0 and chat["mimi_ms"] > 0 and chat["projected_rtf_60gbs"] > 0
        assert chat["ratio"] == pytest.approx(chat["ours_rtf"] / chat["one_process_rtf"], rel=0.02)
    assert {"serve_stt_streams_realtime", "serve_stt_rtf_1", "serve_stt_p95_word_latency_ms_1",
            "serve_stt_streams_realtime_int4", "serve_stt_rtf_1_int4"} <= set(figures)
    for name, figure in figures.items():
        if "relative_error" in figure:  # a quantized model's logits against bf16
            assert 0 < figure["relative_error"] < 1, name
            continue
        unit = next(key[len("ours_"):] for key in figure if key.startswith("ours_"))  # ms, mb, rtf or streams
        if name.startswith("serve_stt_"):  # no reference: Kyutai has no Python STT server
            assert figure[f"ours_{unit}"] >= 0, name
            continue
        assert figure[f"ours_{unit}"] > 0, name
        if "floor_ms" in figure and "reference_ms" not in figure:  # no reference path: int8/int4 at 7B
            continue
        ours, reference = figure[f"ours_{unit}"], figure[f"reference_{unit}"]
        assert reference > 0, name
        assert figure["ratio"] == pytest.approx(ours / reference, rel=0.02), name


def test_quick_mlx_format_benchmark_reports_each_file_against_its_quantize_mode():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "formats_mlx.py"), "--quick", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for variant, mode in (("mlx-q8", "int8"), ("mlx-q4", "int4")):
        for key in ("load", "layer", "step"):
            figure = figures[f"{variant}_{key}_vs_{mode}"]
            assert figure["ours_ms"] > 0 and figure["ratio"] == pytest.approx(
                figure["ours_ms"] / figure["reference_ms"], rel=0.02)
        assert figures[f"{variant}_load_rss_vs_file"]["ours_mb"] > 0
