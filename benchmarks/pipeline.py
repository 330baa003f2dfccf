"""Transcription real-time factor: Mimi encode (32 codebooks) + STT-1B LM step per 80 ms frame.

Random weights at real shapes, the LM quantized as ``moshi transcribe --quantize int8|int4`` loads
it. "pipelined" runs Mimi in a second process, one frame ahead of the LM, so the two stages use
the 2 cores; "sequential" does one after the other, as the transcriber's loop does today. The reference (bf16 LM, sequential, as its
``moshi-inference`` runs) is timed on the first 10 s of the same audio: its cost per frame does
not depend on the position, since it always attends over its whole KV ring.

    python benchmarks/pipeline.py            # 60 s of audio
    python benchmarks/pipeline.py --quick    # 2 s and a 2-layer LM: checks that the code runs
    python benchmarks/pipeline.py --json
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import run_command_line  # noqa: E402
from lm import write_random_weights  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.lm import LMConfig, load_lm  # noqa: E402
from engine.lm_gen import LMGen, Sampling  # noqa: E402
from engine.mimi import MimiConfig, load_mimi, random_mimi_state  # noqa: E402

FRAME = 1920
RATE = 24_000


def _speechlike(seconds: float) -> torch.Tensor:
    """Harmonic bursts with pauses plus a little noise, [1, 1, samples]."""
    t = torch.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / RATE
    voice = sum(torch.sin(k * phase) / k for k in range(1, 8)) * (torch.sin(2 * math.pi * 1.3 * t) > -0.2)
    noise = 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return (0.1 * voice + noise).float().view(1, 1, -1)


def sequential(mimi, gen, wav: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for i in range(wav.shape[-1] // FRAME):
            gen.step(mimi.encode(wav[..., i * FRAME:(i + 1) * FRAME]))
    return time.perf_counter() - start


def _encoder_process(mimi_path: str, conn) -> None:
    """Mimi in its own process: receives the audio, sends each frame's codes as soon as it has them."""
    torch.set_num_threads(1)
    mimi = load_mimi(mimi_path, MimiConfig.official(), num_codebooks=32)
    wav = torch.from_numpy(conn.recv())
    conn.send("ready")
    conn.recv()  # go
    with torch.no_grad(), mimi.streaming(1):
        for i in range(wav.shape[-1] // FRAME):
            conn.send(mimi.encode(wav[..., i * FRAME:(i + 1) * FRAME]).numpy())


def pipelined(mimi_path: Path, gen, wav: torch.Tensor) -> float:
    """Mimi encodes in a second process while the LM steps on the frame before: two processes,
    not two threads, since the many small operations of both stages would fight over the GIL."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    encoder = context.Process(target=_encoder_process, args=(str(mimi_path), theirs), daemon=True)
    encoder.start()
    ours.send(wav.numpy())
    if ours.recv() != "ready":
        raise RuntimeError("the encoder process did not start")
    start = time.perf_counter()
    ours.send("go")
    with torch.no_grad(), gen.streaming(1):
        for _ in range(wav.shape[-1] // FRAME):
            gen.step(torch.from_numpy(ours.recv()))
    elapsed = time.perf_counter() - start
    encoder.join()
    return elapsed


def run(quick: bool) -> dict[str, dict[str, float]]:
    from moshi.models.lm import LMGen as ReferenceGen
    from moshi.models.loaders import get_mimi, get_moshi_lm

    seconds, reference_seconds = (2.0, 1.0) if quick else (60.0, 10.0)
    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    wav = _speechlike(seconds)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="moshi-pipeline-") as folder:
        lm_path, mimi_path = Path(folder) / "stt.safetensors", Path(folder) / "mimi.safetensors"
        write_random_weights(lm_path, cfg)
        save_file(random_mimi_state(MimiConfig.official(), seed=0), mimi_path)

        reference_mimi = get_mimi(str(mimi_path), num_codebooks=32)
        reference_lm = get_moshi_lm(str(lm_path), cfg.to_dict(), device="cpu", dtype=torch.bfloat16)
        reference_wav = wav[..., :int(reference_seconds * RATE)]
        reference_rtf = sequential(reference_mimi, ReferenceGen(reference_lm, use_sampling=False),
                                   reference_wav) / reference_seconds
        del reference_mimi, reference_lm

        mimi = load_mimi(mimi_path, MimiConfig.official(), num_codebooks=32)

        def figure(seconds_taken: float) -> dict[str, float]:
            rtf = seconds_taken / seconds
            return {"ours_rtf": round(rtf, 3), "reference_rtf": round(reference_rtf, 3),
                    "ratio": round(rtf / reference_rtf, 3)}

        for mode in ("int8", "int4"):
            gen = LMGen(load_lm(lm_path, cfg, quantize=mode), Sampling.greedy())
            figures[f"transcribe_rtf_{int(seconds)}s_{mode}"] = figure(pipelined(mimi_path, gen, wav))
            if mode == "int8":
                figures[f"transcribe_rtf_{int(seconds)}s_{mode}_sequential"] = figure(sequential(mimi, gen, wav))
            del gen
    return figures


def print_table(results: dict) -> None:
    for name, figure in results.items():
        print(f"{name:34s} ours RTF {figure['ours_rtf']:.3f}   reference RTF {figure['reference_rtf']:.3f} "
              f"(bf16, sequential)   ratio {figure['ratio']:.3f}")


def main() -> None:
    run_command_line(__doc__, "2 s, small LM: only checks that the code runs", run, print_table)


if __name__ == "__main__":
    main()
