"""The Moshi-7B step against its memory-bandwidth floor, on this machine, in one run.

At batch 1 a step reads each weight it uses once, so no step can be faster than the bytes it
reads over the memory's read bandwidth. This script measures that bandwidth (a read of a tensor
much larger than the caches, on 1 thread and on every usable core; see ``read_rate``), counts the bytes a 7B step
reads (the temporal transformer and the text head, the depformer's 8 steps, one row of each
embedding table looked up) and times our bf16, int8, int4 and Q8_0 steps against it, the quantized
ones also with ``--exact``'s unquantized activations (``*_exact``). A bandwidth sample is
taken before each step, so that both see the same load from other processes; each step's floor
uses the median of its own samples.

With each model, a live chat (``ChatRunner``, Mimi at full size) gives its real-time factor with
Mimi in its own process and in this one, alternating (``chat_rtf_*``), and its projection to a
machine reading 60 GB/s: the LM step at the same ratio to its floor, Mimi (compute-bound) as here.

The 7B models are built in memory one at a time, tensor by tensor, the quantized ones directly in
their quantized form from random codes and scales (no float copy of their weights ever exists), so
the run fits a 24 GB machine: bf16 takes 15 GB, int8 8 GB, int4 4 GB.

    python benchmarks/floor.py           # the 7B steps against their floor, and chat's RTF
    python benchmarks/floor.py --quick   # small shapes: checks that the code runs
    python benchmarks/floor.py --json
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402
from common import run_command_line  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from audio import FRAME_SIZE  # noqa: E402
from engine import kernels, quant  # noqa: E402
from engine.encoder import EncoderProcess, usable_cores  # noqa: E402
from engine.mimi.loading import load_mimi  # noqa: E402
from engine.mimi.model import MimiConfig  # noqa: E402
from engine.mimi.tiny import random_mimi_state  # noqa: E402
from engine.moshi.generate import LMGen, Sampling  # noqa: E402
from engine.moshi.model import LMConfig, LMModel  # noqa: E402
from engine.moshi.runner import ChatRunner  # noqa: E402
from engine.runner import FirstFrame, Models  # noqa: E402
from engine.tiny import write_tiny_checkpoint  # noqa: E402
from engine.weights import load_weights  # noqa: E402

# The standard deviation of a code drawn uniformly from the int8 range [-127, 127] and from 0..15:
# the scales below give every weight a standard deviation of 1/sqrt(fan_in), as N(0, 1/fan_in) does.
_INT8_CODE_STD = 127 / 3 ** 0.5
_INT4_CODE_STD = (255 / 12) ** 0.5


def read_rate(data: torch.Tensor) -> float:
    """GB/s of one read over ``data``: on one thread with the native kernels built, their
    prefetching read (what the kernels themselves reach: one thread read 11.9 GB/s with it
    against 10.5 GB/s for PyTorch's sum), else PyTorch's sum."""
    start = time.perf_counter()
    if torch.get_num_threads() == 1 and kernels.chosen_variant() is not None:
        kernels.read_bytes(data)
    else:
        data.sum()
    return data.nbytes / (time.perf_counter() - start) / 1e9


def big_tensor(megabytes: int) -> torch.Tensor:
    """``megabytes`` of fp32, far beyond any cache, every page written once (so really mapped)."""
    return torch.ones(megabytes << 18)


def read_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """GB/s read by a sum over ``megabytes`` on ``threads`` threads, median of ``repeats``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = big_tensor(megabytes)
        data.sum()
        return statistics.median(read_rate(data) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)


def weight_bytes_per_step(model: LMModel) -> int:
    """The bytes of weights one step of ``model`` reads: every linear, norm and head once (the
    depformer's per-step weights once each over its ``dep_q`` steps), one row per embedding table."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes
        elif isinstance(module, quant.Int8Linear):
            # Once packed for oneDNN the int8 weight lives outside the module's parameters.
            total += module.in_features * module.out_features + module.weight_scb.nbytes
        else:
            total += sum(p.nbytes for p in module.parameters(recurse=False) if p is not None)
    return total


def floor_ms(nbytes: int, bandwidth_gbs: float) -> float:
    return nbytes / (bandwidth_gbs * 1e9) * 1000


def _random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator)
    if key.endswith(quant.SCALE_SUFFIX):  # absmax per row, for weights of std 1/sqrt(fan_in)
        return torch.full(shape, 127 / _INT8_CODE_STD, dtype=torch.float32)
    noise = torch.randn(shape, generator=generator)
    if key.endswith(".alpha"):
        return (1 + 0.1 * noise).to(dtype)
    return (noise / shape[-1] ** 0.5).to(dtype)


def random_lm(cfg: LMConfig, mode: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
              text_vocab: int | None = None) -> LMModel:
    """A random LM with its linears already in ``mode`` ("bf16", "int8", "int4", or "q8_0": the
    layout of Kyutai's candle ``model.q8.gguf``), built one tensor at a time:
    the float weights of the quantized linears never exist, so memory stays that of the result.
    ``text_vocab``: the text head's rows from there on give 0, so that greedy decoding stays within
    a smaller tokenizer's pieces."""
    device = torch.device("cpu")
    with torch.device("meta"):
        model = LMModel(cfg)
    names = quant.quantized_linear_names(model)
    if mode == "q8_0":
        for name in names:
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent) if parent else model, child,
                    quant.BlockInt8Linear(linear.in_features, linear.out_features, dtype))
    elif mode != "bf16":
        quant.replace_linears(model, names, mode, dtype)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        module = model.get_submodule(key.rpartition(".")[0])
        if isinstance(module, quant.AffineLinear) and key.endswith(".weight"):  # two random 4-bit codes a byte
            state[key] = torch.randint(0, 256, tuple(value.shape), dtype=torch.uint8, generator=generator)
        elif isinstance(module, quant.BlockInt8Linear) and key.endswith(".scales"):
            state[key] = torch.full(tuple(value.shape), 1 / (_INT8_CODE_STD * module.in_features ** 0.5))
        elif isinstance(module, quant.AffineLinear):
            scale = 1 / (_INT4_CODE_STD * module.in_features ** 0.5)
            if key.endswith(".scales"):
                state[key] = torch.full(tuple(value.shape), scale)
            else:  # biases: centre the codes (7.5 is their mean), with some noise
                state[key] = scale * (-7.5 + 0.1 * torch.randn(tuple(value.shape), generator=generator))
        else:
            state[key] = _random_tensor(key, tuple(value.shape), value.dtype if value.dtype == torch.int8 else dtype,
                                        generator)
    if text_vocab is not None:
        if mode == "bf16":
            state["text_linear.weight"][text_vocab:] = 0
        elif "text_linear.weight_scb" in state:
            state["text_linear.weight_scb"][text_vocab:] = 0
        elif mode == "q8_0":
            state["text_linear.scales"][text_vocab:] = 0
        else:
            state["text_linear.scales"][text_vocab:] = 0
            state["text_linear.biases"][text_vocab:] = 0
    load_weights(model, state, f"random {mode}", dtype=dtype, device=device)
    del state
    if mode == "bf16":
        return model.eval()
    quant.finish_quantized(model, device)
    for module in model.modules():
        if isinstance(module, quant.BlockInt8Linear):
            module.prepare()
    return model.eval()


def time_steps(gen: LMGen, cfg: LMConfig, warmup: int, steps: int, data: torch.Tensor) -> tuple[list, list]:
    """Step times (ms) and, before each step, the read rate of a sum over ``data`` (GB/s): both see
    the same load from the machine's other processes."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.card, (warmup + steps, 1, cfg.n_q - cfg.dep_q, 1), generator=generator)
    times, rates = [], []
    with torch.no_grad(), gen.streaming(1):
        for t in range(warmup + steps):
            rate = read_rate(data)
            start = time.perf_counter()
            gen.step(codes[t])
            if t >= warmup:
                times.append((time.perf_counter() - start) * 1000)
                rates.append(rate)
    return times, rates


def floor_row(ours_ms: list[float], nbytes: int, bandwidth_gbs: float) -> dict[str, float]:
    ours, floor = statistics.median(ours_ms), floor_ms(nbytes, bandwidth_gbs)
    return {"ours_ms": round(ours, 2), "floor_ms": round(floor, 2), "floor_ratio": round(ours / floor, 3),
            "gb_per_step": round(nbytes / 1e9, 3), "bandwidth_gbs": round(bandwidth_gbs, 2)}


def speechlike_frames(count: int) -> np.ndarray:
    """``pipeline.speechlike`` cut into frames: [count, FRAME_SIZE]."""
    from pipeline import RATE, speechlike  # pipeline imports this module

    return speechlike(count * FRAME_SIZE / RATE).numpy()[:count * FRAME_SIZE].reshape(count, FRAME_SIZE)


def chat_block(runner: ChatRunner, frames: np.ndarray, skip: int) -> list[dict[str, float]]:
    """A fresh conversation of ``frames``: the stage times of its steps after the first ``skip``.
    The runners of one benchmark share the LM, so each streams only for its block."""
    runner.gen.start_streaming(1)
    runner.reset()
    timings = [runner.step(frame).timings_ms for frame in frames]
    runner.gen.stop_streaming()
    return timings[skip:]


def chat_rtf(lm: LMModel, folder: Path, frames: int, blocks: int) -> dict[str, float]:
    """A live chat's real-time factor (frame time / 80 ms) with Mimi in its own process and in
    this one, the same LM, Mimi at full size. The two alternate block by block (each a fresh
    conversation of ``frames`` timed steps), so both see the same load from other processes."""
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    mimi_path = folder / "mimi.safetensors"
    runners = {}
    # Mimi as a chat on a CPU runs it by default (its fast kernels, not --exact)
    for name, mimi in (("one", load_mimi(mimi_path, MimiConfig.official(), exact_codes=False)),
                       ("piped", EncoderProcess(mimi_path, MimiConfig.official(), 8, 1, exact_codes=False))):
        runners[name] = ChatRunner(Models("random 7B", mimi, lm, lm, tokenizer, Sampling.greedy()), FirstFrame.SERVER)
        runners[name].gen.stop_streaming()
    runners["piped"].encoder.wait_ready()
    times: dict[str, list] = {"one": [], "piped": []}
    try:
        for block in range(blocks + 1):  # the first block warms up
            for name, runner in runners.items():
                skip = 1 + 2 * runner.pipelined  # the first step, and the pipeline's two empty ones
                timings = chat_block(runner, speechlike_frames(skip + frames), skip)
                if block:
                    times[name] += timings
    finally:
        runners["piped"].close()
    frame_ms = FRAME_SIZE / 24
    rtf = statistics.median(t["total"] for t in times["piped"]) / frame_ms
    one_rtf = statistics.median(t["total"] for t in times["one"]) / frame_ms
    return {"ours_rtf": round(rtf, 3), "one_process_rtf": round(one_rtf, 3), "ratio": round(rtf / one_rtf, 3),
            "lm_ms": round(statistics.median(t["lm"] for t in times["one"]), 1),
            "mimi_ms": round(statistics.median(t["encode"] + t["decode"] for t in times["one"]), 1)}


def projected_rtf(chat: dict[str, float], bandwidth_gbs: float, target_gbs: float = 60.0) -> float:
    """The pipelined frame on a machine reading ``target_gbs``: the LM step at the same ratio to its
    floor (scaled by the bandwidths), Mimi's stages as here."""
    return round(max(chat["lm_ms"] * bandwidth_gbs / target_gbs, chat["mimi_ms"]) / (FRAME_SIZE / 24), 3)


def run(quick: bool) -> dict[str, dict[str, float]]:
    cfg = LMConfig.moshi_7b()
    if quick:
        cfg = dataclasses.replace(cfg, dim=512, num_layers=2, text_card=1000, depformer_num_layers=1, context=100)
    warmup, steps = (1, 2) if quick else (2, 7)
    megabytes = 64 if quick else 1024
    figures: dict[str, dict[str, float]] = {}
    all_rates = []
    with tempfile.TemporaryDirectory(prefix="moshi-floor-") as root:
        folder = write_tiny_checkpoint(Path(root) / "chat", "chat")  # its tokenizer; Mimi at full size:
        save_file(random_mimi_state(MimiConfig.official(), seed=0), folder / "mimi.safetensors")
        vocab = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
        for mode in ("bf16", *quant.MODES, "q8_0"):  # one model at a time: two would not fit in 24 GB
            lm = random_lm(cfg, mode, text_vocab=vocab)
            times, rates = time_steps(LMGen(lm, Sampling.greedy()), cfg, warmup, steps, big_tensor(megabytes))
            figures[f"moshi7b_step_{mode}"] = floor_row(times, weight_bytes_per_step(lm), statistics.median(rates))
            all_rates += rates
            if mode != "q8_0":  # chat's RTF: bf16 and the --quantize paths
                chat = chat_rtf(lm, folder, frames=2 if quick else 3, blocks=1 if quick else 3)
                figures[f"chat_rtf_{mode}"] = {**chat, "projected_rtf_60gbs": projected_rtf(
                    chat, statistics.median(rates))}
            if mode == "bf16":
                del lm
                gc.collect()
                continue
            # --exact: the same weights, the activations left as they are
            quant.exact_activations(lm)
            times, rates = time_steps(LMGen(lm, Sampling.greedy()), cfg, warmup, steps, big_tensor(megabytes))
            figures[f"moshi7b_step_{mode}_exact"] = floor_row(times, weight_bytes_per_step(lm), statistics.median(rates))
            del lm
            gc.collect()
    figures["bandwidth_gbs"] = {"one_thread_gbs": round(statistics.median(all_rates), 2),
                                "all_threads_gbs": round(read_bandwidth(usable_cores(), megabytes), 2),
                                "threads": usable_cores()}
    return figures


# What the table's reference column is, under it.
NOTE = ("7B rows: no reference column (the reference has no CPU int8/int4 path), the floor instead; "
        "chat_rtf: the reference column is one process")


def main() -> None:
    run_command_line(__doc__, "small shapes: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
