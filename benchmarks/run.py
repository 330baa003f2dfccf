"""Run every benchmark: ours against the reference in the same run, 1 torch thread, medians.

    python benchmarks/run.py            # full size; prints a table
    python benchmarks/run.py --json     # {"name": {"ours_ms", "reference_ms", "ratio"}, ...}
    python benchmarks/run.py --quick    # small shapes, seconds: CI runs this so the scripts never rot
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm  # noqa: E402
import mimi  # noqa: E402
import torch  # noqa: E402

BENCHMARKS = (mimi, lm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: only checks that the code runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for module in BENCHMARKS:
        results.update(module.run(args.quick))
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'':26s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}")
    for name, figures in results.items():
        print(f"{name:26s} {figures['ours_ms']:8.1f}ms {figures['reference_ms']:8.1f}ms {figures['ratio']:7.2f}")


if __name__ == "__main__":
    main()
