"""LM step time, ours against the reference, on random weights at real shapes, 1 torch thread.

Both implementations load the same safetensors file (memory-mapped, so the weights are in RAM
once) and step the same user codes; calls alternate so that both see the same machine load.

    python benchmarks/lm.py            # STT-1B shape (dim 2048, 16 layers, 16 heads, vocab 8000)
    python benchmarks/lm.py --quick    # 2 layers at the same width: checks that the code runs
    python benchmarks/lm.py --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import summary  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.lm import LMConfig, load_lm, random_lm_state  # noqa: E402
from engine.lm_gen import LMGen, Sampling  # noqa: E402


def _timed(step, codes) -> float:
    start = time.perf_counter()
    step(codes)
    return (time.perf_counter() - start) * 1000


def bench_lm_step(cfg: LMConfig, dtype: torch.dtype, warmup: int, steps: int) -> dict[str, float]:
    from moshi.models.lm import LMGen as ReferenceGen
    from moshi.models.loaders import get_moshi_lm

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_file(random_lm_state(cfg, seed=0), path)
        ours = LMGen(load_lm(path, cfg, dtype=dtype), Sampling.greedy())
        reference = ReferenceGen(get_moshi_lm(str(path), cfg.to_dict(), device="cpu", dtype=dtype),
                                 use_sampling=False)
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, cfg.card, (warmup + steps, 1, cfg.n_q - cfg.dep_q, 1), generator=generator)
        ours_ms, reference_ms = [], []
        with ours.streaming(1), reference.streaming(1), torch.no_grad():
            # Step by step in turn, so that both see the same load on a shared machine.
            for t in range(warmup + steps):
                ours_t, reference_t = _timed(ours.step, codes[t]), _timed(reference.step, codes[t])
                if t >= warmup:
                    ours_ms.append(ours_t)
                    reference_ms.append(reference_t)
    return summary(ours_ms, reference_ms)


def run(quick: bool) -> dict[str, dict[str, float]]:
    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    warmup, steps = (1, 4) if quick else (3, 20)
    return {"stt1b_step_bf16": bench_lm_step(cfg, torch.bfloat16, warmup, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run that only checks the code runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.quick)
    if args.json:
        print(json.dumps(results))
        return
    for name, figures in results.items():
        print(f"{name:24s} ours {figures['ours_ms']:8.1f} ms   reference {figures['reference_ms']:8.1f} ms   "
              f"ratio {figures['ratio']:.2f}")


if __name__ == "__main__":
    main()
