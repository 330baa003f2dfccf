"""Mimi streaming encode/decode time per 80 ms frame, ours against the reference, 1 torch thread.

Both implementations load the same random full-size weights from one safetensors file and
process the same audio; calls alternate frame by frame so that both see the same machine load.
The plain rows time our Mimi as ``--exact`` builds it (codes bit-identical to the reference's);
the ``*_fast`` rows as it runs by default on a CPU (``exact_codes=False``: faster kernels whose
rounding can flip a codeword near-tie, and bfloat16 decoding weights where the CPU multiplies
bfloat16 itself; tests/engine/test_mimi.py bounds both). ``mimi_codec*`` is a frame's encode
plus decode, against the reference's.

    python benchmarks/mimi.py            # 100 timed frames after warm-up
    python benchmarks/mimi.py --quick    # a few frames: checks that the code runs
    python benchmarks/mimi.py --json
"""

from __future__ import annotations

import contextlib
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
from common import run_command_line, summary  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.mimi.loading import load_mimi  # noqa: E402
from engine.mimi.model import MimiConfig  # noqa: E402
from engine.mimi.tiny import random_mimi_state  # noqa: E402


def _audio(frames: int, frame_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(frames * frame_size) / 24_000
    tone = 0.3 * torch.sin(2 * math.pi * (200 + 600 * (t % 2)) * t)
    return (tone + 0.05 * torch.randn(t.shape, generator=generator)).view(1, 1, -1)


def _timed(call, *args):
    start = time.perf_counter()
    out = call(*args)
    return out, (time.perf_counter() - start) * 1000


def _stream(encoders: dict, reference, wav, frame_size: int, warmup: int, decode: bool) -> dict[str, list[float]]:
    """Per-frame times of each of our models and the reference's: encoding ("encode/<name>"),
    decoding the reference's codes ("decode/<name>") and the two ("codec/<name>")."""
    times: dict[str, list[float]] = {}
    models = [*encoders.values(), reference]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model.streaming(1))
        for i in range(wav.shape[-1] // frame_size):
            frame = wav[..., i * frame_size:(i + 1) * frame_size]
            figures = {f"encode/{name}": _timed(encoder.encode, frame)[1] for name, encoder in encoders.items()}
            codes, figures["encode/reference"] = _timed(reference.encode, frame)
            if decode:
                for name, model in [*encoders.items(), ("reference", reference)]:
                    figures[f"decode/{name}"] = _timed(model.decode, codes)[1]
                    figures[f"codec/{name}"] = figures[f"encode/{name}"] + figures[f"decode/{name}"]
            if i >= warmup:
                for name, ms in figures.items():
                    times.setdefault(name, []).append(ms)
    return times


def run(quick: bool) -> dict[str, dict[str, float]]:
    from moshi.models.loaders import get_mimi

    warmup, frames = (2, 5) if quick else (5, 100)
    config = MimiConfig.official()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mimi.safetensors"
        save_file(random_mimi_state(config, seed=0), path)
        encoders = {"ours": load_mimi(path, config, num_codebooks=8),
                    "fast": load_mimi(path, config, num_codebooks=8, exact_codes=False)}
        reference = get_mimi(str(path), num_codebooks=8)
    wav = _audio(warmup + frames, config.frame_size)
    eight = _stream(encoders, reference, wav, config.frame_size, warmup, decode=True)
    for model in [*encoders.values(), reference]:
        model.set_num_codebooks(32)
    all_32 = _stream(encoders, reference, wav, config.frame_size, warmup, decode=False)
    return {
        "mimi_encode": summary(eight["encode/ours"], eight["encode/reference"]),
        "mimi_decode": summary(eight["decode/ours"], eight["decode/reference"]),
        "mimi_decode_fast": summary(eight["decode/fast"], eight["decode/reference"]),
        "mimi_encode_32": summary(all_32["encode/ours"], all_32["encode/reference"]),
        "mimi_encode_fast": summary(eight["encode/fast"], eight["encode/reference"]),
        "mimi_encode_32_fast": summary(all_32["encode/fast"], all_32["encode/reference"]),
        "mimi_codec": summary(eight["codec/ours"], eight["codec/reference"]),
        "mimi_codec_fast": summary(eight["codec/fast"], eight["codec/reference"]),
    }


# What the table's reference column is, under it.
NOTE = ("medians per 80 ms frame")


def main() -> None:
    run_command_line(__doc__, "a few frames: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
