"""Mimi streaming encode/decode time per 80 ms frame, ours against the reference, 1 torch thread.

Both implementations load the same random full-size weights from one safetensors file and
process the same audio; calls alternate frame by frame so that both see the same machine load.

    python benchmarks/mimi.py            # 100 timed frames after warm-up
    python benchmarks/mimi.py --quick    # a few frames: checks that the code runs
    python benchmarks/mimi.py --json
"""

from __future__ import annotations

import argparse
import json
import math
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

from engine.mimi import MimiConfig, load_mimi, random_mimi_state  # noqa: E402


def _audio(frames: int, frame_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(frames * frame_size) / 24_000
    tone = 0.3 * torch.sin(2 * math.pi * (200 + 600 * (t % 2)) * t)
    return (tone + 0.05 * torch.randn(t.shape, generator=generator)).view(1, 1, -1)


def _timed(call, *args):
    start = time.perf_counter()
    out = call(*args)
    return out, (time.perf_counter() - start) * 1000


def _stream(ours, reference, wav, frame_size: int, warmup: int, decode: bool) -> dict[str, list[list[float]]]:
    """Per-frame times [ours, reference] for encode (and decode of the reference's codes)."""
    times: dict[str, list[list[float]]] = {"encode": [[], []], "decode": [[], []]}
    with torch.no_grad(), ours.streaming(1), reference.streaming(1):
        for i in range(wav.shape[-1] // frame_size):
            frame = wav[..., i * frame_size:(i + 1) * frame_size]
            _, ours_encode = _timed(ours.encode, frame)
            codes, reference_encode = _timed(reference.encode, frame)
            figures = {"encode": (ours_encode, reference_encode)}
            if decode:
                _, ours_decode = _timed(ours.decode, codes)
                _, reference_decode = _timed(reference.decode, codes)
                figures["decode"] = (ours_decode, reference_decode)
            if i >= warmup:
                for name, (ours_ms, reference_ms) in figures.items():
                    times[name][0].append(ours_ms)
                    times[name][1].append(reference_ms)
    return times


def run(quick: bool) -> dict[str, dict[str, float]]:
    from moshi.models.loaders import get_mimi

    warmup, frames = (2, 5) if quick else (5, 100)
    config = MimiConfig.official()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mimi.safetensors"
        save_file(random_mimi_state(config, seed=0), path)
        ours = load_mimi(path, config, num_codebooks=8)
        reference = get_mimi(str(path), num_codebooks=8)
    wav = _audio(warmup + frames, config.frame_size)
    eight = _stream(ours, reference, wav, config.frame_size, warmup, decode=True)
    ours.set_num_codebooks(32)
    reference.set_num_codebooks(32)
    all_32 = _stream(ours, reference, wav, config.frame_size, warmup, decode=False)
    return {
        "mimi_encode": summary(*eight["encode"]),
        "mimi_decode": summary(*eight["decode"]),
        "mimi_encode_32": summary(*all_32["encode"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few frames: only checks that the code runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.quick)
    if args.json:
        print(json.dumps(results))
        return
    for name, figures in results.items():
        print(f"{name:16s} ours {figures['ours_ms']:7.1f} ms   reference {figures['reference_ms']:7.1f} ms   "
              f"ratio {figures['ratio']:.2f}   (median per 80 ms frame)")


if __name__ == "__main__":
    main()
