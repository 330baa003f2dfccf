"""Run every benchmark: ours against the reference in the same run, 1 torch thread, medians.

    python benchmarks/run.py             # full size; prints a table
    python benchmarks/run.py --full-7b   # also the full Moshi-7B step (writes a 15 GB file, ~20 GB of RAM)
    python benchmarks/run.py --json      # {"name": {"ours_ms", "reference_ms", "ratio"}, ...}
    python benchmarks/run.py --quick     # small shapes, seconds: CI runs this so the scripts never rot

Besides times (``*_ms``), the JSON holds peak memory (``ours_mb``/``reference_mb``), real-time
factors (``ours_rtf``/``reference_rtf``), the quantized models' logit errors (``relative_error``),
this machine's read bandwidth (``bandwidth_gbs``) and, for the 7B steps, the bandwidth floor
(``floor_ms``: the weights a step reads over the 1-thread bandwidth) with ``floor_ratio``.
``chat_url_added_latency_ms`` compares a frame's round trip through `moshi serve` on loopback (ours)
with the in-process engine's (reference); ``added_ms`` is the difference of the medians.
Our int8/int4 rows are compared with the reference's bf16 step: it has no CPU int8 path; the 7B
int8/int4 steps (built quantized, without the 15 GB file) only with their floor. The candle q8 rows
(``q8_0_*``, ``candle_q8_*``) compare the Q8_0 kernel and loader with our ``--quantize int8``.
The ``serve_stt_*`` figures (``benchmarks/serve.py``) have ours only: Kyutai has no Python STT server.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_url  # noqa: E402
import floor  # noqa: E402
import formats  # noqa: E402
import lm  # noqa: E402
import mimi  # noqa: E402
import pipeline  # noqa: E402
import serve  # noqa: E402
from common import run_command_line  # noqa: E402


def measure(quick: bool, full_7b: bool) -> dict[str, dict[str, float]]:
    return {**mimi.run(quick), **lm.run(quick, full_7b=full_7b), **floor.run(quick), **formats.run(quick),
            **pipeline.run(quick), **chat_url.run(quick), **serve.run(quick)}


# What the table's reference column is, under it.
NOTE = ("int8/int4 rows: the reference column is the reference's bf16 (it has no CPU int8 path); "
        "q8_0/candle_q8 rows: it is our --quantize int8 (candle_q8_rss_vs_file: the file's size); "
        "serve_stt rows have ours only")


def main() -> None:
    run_command_line(__doc__, "small shapes: only checks that the code runs", measure, NOTE, full_7b=True)


if __name__ == "__main__":
    main()
