"""benchmarks/gpu.py's parts that need no GPU: what it says without one, its options, the bytes a
7B step reads (against a count from the architecture), the floor arithmetic and the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.moshi.model import LMConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_fails():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == gpu.NO_GPU and result.stdout == ""


def test_options():
    args = gpu.parse_args(["--quick", "--skip-compile", "--steps", "5", "--json"])
    assert (args.quick, args.skip_compile, args.steps, args.json) == (True, True, 5, True)
    assert gpu.parse_args([]).steps == 30 and not gpu.parse_args([]).skip_compile
    with pytest.raises(SystemExit):
        gpu.parse_args(["--steps", "2"])  # the warm-up alone takes three


def _params_per_step(cfg: LMConfig) -> int:
    """The weights a Moshi step multiplies by, from the architecture: each temporal layer's
    attention (4·d²) and gated FFN (3·d·ffn), the text head, and the depformer's per-step copies of
    the same over its dep_q steps, with its input projections and codebook heads."""
    d, dd = cfg.dim, cfg.depformer_dim
    temporal = cfg.num_layers * (4 * d * d + 3 * d * cfg.ffn_hidden) + d * cfg.text_card
    depth = cfg.dep_q * (cfg.depformer_num_layers * (4 * dd * dd + 3 * dd * cfg.depformer_ffn_hidden)
                         + d * dd + dd * cfg.card)
    return temporal + depth


def test_bytes_per_7b_step_follow_the_architecture():
    cfg = LMConfig.moshi_7b()
    params = _params_per_step(cfg)
    assert params == pytest.approx(7.37e9, rel=0.002)  # the published count of a 7B step's weights
    bf16, int8, int4 = (gpu.step_bytes(cfg, mode) for mode in (None, "int8", "int4"))
    # Norms and the embedding rows looked up add well under a thousandth.
    assert bf16 == pytest.approx(2 * params, rel=1e-3)
    assert int8 == pytest.approx(params, rel=3e-3)  # one byte each, and an fp32 scale per output row
    assert int4 == pytest.approx(params * (0.5 + 4 / 128), rel=3e-3)  # two bf16 per group of 128 inputs


def test_floor_arithmetic_and_token_agreement():
    figures = gpu.floor_figures(ours_ms=10.0, nbytes=2_000_000_000, bandwidth_gbs=100.0)
    assert figures == {"gb_per_step": 2.0, "floor_ms": 20.0, "floor_ratio": 0.5}
    assert gpu.agreement([1, 2, None, 4], [1, 3, 5, 4]) == pytest.approx(2 / 3, abs=1e-3)
    assert gpu.agreement([None], [1]) == 0.0


def test_table_shows_every_figure():
    row = {"gb_per_step": 14.75, "floor_ms": 4.92, "ours_ms": 41.5, "reference_ms": 55.25, "ratio": 0.751,
           "floor_ratio": 8.43, "model_gb": 15.38, "peak_gb": 17.9, "ran_as": "cuda-graph"}
    mode = {"ours_ms": 38.75, "first_call_ms": 95123.0, "ran_as": "compile", "tokens_agree_with_eager": 0.97,
            "tokens_agree_with_reference": 0.93, "fallbacks": []}
    results = {"device": "NVIDIA H100 80GB HBM3", "bandwidth_gbs": 3001.0,
               "moshi7b_step_bf16": row, "moshi7b_step_int8": {**row, "ours_ms": 33.25},
               "step_modes": {"compile": mode, "eager": {**mode, "ran_as": "eager", "fallbacks": ["compile: X"]}},
               "fallback_chain": {"modes": ["compile", "cuda-graph", "eager"], "ended_in": "eager", "fallbacks": 2,
                                  "correct": True},
               "transcribe_rtf_60s": {"ours_rtf": 0.0425}, "seconds": 212.0}
    table = gpu.format_table(results)
    for text in ("NVIDIA H100 80GB HBM3", "3001 GB/s", "14.75", "4.92", "41.50", "55.25", "0.751", "8.43", "15.38",
                 "17.90", "33.25", "38.75", "95123", "0.97", "0.93", "compile: X", "ended in eager after 2",
                 "correct", "0.0425", "212 s"):
        assert text in table, text
    assert "int4" not in table  # a row it was not given


def test_dry_run_on_the_cpu_reports_every_check(tmp_path):
    """The whole check, every step mode running eager, on small shapes: the code a GPU runs, less
    its CUDA calls. Our bf16 model is the reference's weights, so their tokens agree."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--device", "cpu",
                             "--steps", "3", "--json"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in ("bf16", "int8", "int4"):
        row = results[f"moshi7b_step_{mode}"]
        assert row["ours_ms"] > 0 and row["reference_ms"] > 0 and row["floor_ms"] > 0, mode
        assert row["ratio"] == pytest.approx(row["ours_ms"] / row["reference_ms"], rel=0.01)
    assert set(results["step_modes"]) == set(gpu.MODES)
    assert all(row["ran_as"] == "eager" for row in results["step_modes"].values())  # no CUDA: eager only
    assert results["step_modes"]["eager"]["tokens_agree_with_reference"] == 1.0
    assert results["fallback_chain"]["correct"] and results["fallback_chain"]["ended_in"] == "eager"
    assert results["transcribe_rtf_5s"]["ours_rtf"] > 0
    assert "fallback chain" in gpu.format_table(results)
