"""Run every benchmark: ours against the reference in the same run, 1 torch thread, medians.

    python benchmarks/run.py             # full size; prints a table
    python benchmarks/run.py --full-7b   # also the full Moshi-7B step (writes a 15 GB file, ~20 GB of RAM)
    python benchmarks/run.py --json      # {"name": {"ours_ms", "reference_ms", "ratio"}, ...}
    python benchmarks/run.py --quick     # small shapes, seconds: CI runs this so the scripts never rot

Besides times (``*_ms``), the JSON holds peak memory (``ours_mb``/``reference_mb``), real-time
factors (``ours_rtf``/``reference_rtf``) and the quantized models' logit errors (``relative_error``).
The ``serve_stt_*`` figures (``benchmarks/serve.py``) have ours only: Kyutai has no Python STT server.
Our int8/int4 rows are compared with the reference's bf16 step: it has no CPU int8 path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm  # noqa: E402
import mimi  # noqa: E402
import pipeline  # noqa: E402
import serve  # noqa: E402
from common import run_command_line  # noqa: E402


def _row(name: str, figure: dict) -> str:
    if "relative_error" in figure:
        return f"{name:34s} {'relative error of the text logits vs our bf16:':>47s} {figure['relative_error']:.4f}"
    unit = next(key[len("ours_"):] for key in figure if key.startswith("ours_"))
    if f"reference_{unit}" not in figure:  # `moshi serve`'s: Kyutai has no Python STT server to compare with
        return f"{name:34s} {figure[f'ours_{unit}']:12.2f} {'':12s} {unit:>4s}"
    ours, reference = figure[f"ours_{unit}"], figure[f"reference_{unit}"]
    return f"{name:34s} {ours:12.2f} {reference:12.2f} {unit:>4s} {figure['ratio']:7.3f}"


def print_table(results: dict) -> None:
    print(f"{'':34s} {'ours':>12s} {'reference':>12s} {'':4s} {'ratio':>7s}")
    for name, figure in results.items():
        print(_row(name, figure))
    print("int8/int4 rows: the reference column is the reference's bf16 (it has no CPU int8 path)")


def measure(quick: bool, full_7b: bool) -> dict[str, dict[str, float]]:
    return {**mimi.run(quick), **lm.run(quick, full_7b=full_7b), **pipeline.run(quick), **serve.run(quick)}


def main() -> None:
    run_command_line(__doc__, "small shapes: only checks that the code runs", measure, print_table, full_7b=True)


if __name__ == "__main__":
    main()
