"""What every benchmark shares: medians of ours and the reference with their ratio, and the
command line (``--quick``, ``--json``, 1 torch thread) around a script's measurements."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from typing import Callable

import torch


def summary(ours_ms: list[float], reference_ms: list[float]) -> dict[str, float]:
    ours, reference = statistics.median(ours_ms), statistics.median(reference_ms)
    # Four significant digits, not two decimals: a quick run's sub-millisecond times keep their ratio.
    return {"ours_ms": float(f"{ours:.4g}"), "reference_ms": float(f"{reference:.4g}"),
            "ratio": round(ours / reference, 3)}


# The x86 features that choose our CPU kernels (bf16 and int8 matmuls, attention).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> str:
    """The CPU, its kernel-relevant features and the kernels PyTorch chose on it: figures from
    machines with other features are not comparable."""
    from engine.quant import grouped_kernel, int8_kernel

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    features = " ".join(f for f in CPU_FEATURES if f in flags) or "none of " + "/".join(CPU_FEATURES)
    return (f"{name}; {features}; torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; int8: {int8_kernel()}; int4/q8_0/mlx: {grouped_kernel()}")


def _row(name: str, figure: dict) -> str:
    if "relative_error" in figure:
        return f"{name:34s} {'relative error of the text logits:':>47s} {figure['relative_error']:.4f}"
    if name == "bandwidth_gbs":
        return (f"{'read bandwidth (GB/s), 1 thread':34s} {figure['one_thread_gbs']:12.2f}   "
                f"{figure['threads']:.0f} threads {figure['all_threads_gbs']:.2f}")
    unit = next(key[len("ours_"):] for key in figure if key.startswith("ours_"))
    reference = f"{figure[f'reference_{unit}']:12.2f}" if f"reference_{unit}" in figure else f"{'—':>12s}"
    ratio = f"{figure['ratio']:7.3f}" if "ratio" in figure else f"{'':7s}"
    line = f"{name:34s} {figure[f'ours_{unit}']:12.2f} {reference} {unit:>4s} {ratio}"
    if "floor_ms" in figure:
        line += (f"   floor {figure['floor_ms']:.1f} ms ({figure['gb_per_step']:.2f} GB), "
                 f"ours/floor {figure['floor_ratio']:.2f}")
    return line


def print_table(results: dict, note: str = "") -> None:
    """Every benchmark's figures as one table: ours, the reference column, the ratio (``note`` says
    what the reference column is where it is not the reference implementation)."""
    print(f"{'':34s} {'ours':>12s} {'reference':>12s} {'':4s} {'ratio':>7s}")
    for name, figure in results.items():
        print(_row(name, figure))
    if note:
        print(note)


def run_command_line(doc: str, quick_help: str, measure: Callable[..., dict], note: str = "",
                     full_7b: bool = False) -> None:
    """Parse the script's options, run ``measure(quick)`` (``measure(quick, full_7b=...)`` with
    ``full_7b``, which adds the ``--full-7b`` option) on 1 torch thread and print its figures: one
    JSON object with ``--json``, else the table (``print_table``, with ``note``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if full_7b:
        parser.add_argument("--full-7b", action="store_true", help="also the full Moshi-7B step (15 GB file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(args.quick, full_7b=args.full_7b) if full_7b else measure(args.quick)
    if args.json:
        print(f"machine: {machine()}", file=sys.stderr)
        print(json.dumps(results))
    else:
        print(f"machine: {machine()}")
        print_table(results, note)
