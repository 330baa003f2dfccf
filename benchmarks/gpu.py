"""Check moshi's CUDA path end to end on one GPU, random weights at real shapes, in a few minutes.

What it runs, and prints as a table (or one JSON object):

* the GPU's read bandwidth (a sum over 2 GiB of bf16, CUDA events, median of 10);
* the Moshi-7B step in bf16, int8 and int4: the weights a step reads, the floor (those bytes over
  the bandwidth), our step time and the reference's (moshi 0.2.13, bf16, with its CUDA graphs) on
  the same GPU and the same random weights (the reference's own initialisation, shared with ours),
  the GPU memory the model takes and the peak while it steps;
* each step mode of engine/compile.py on the bf16 7B (compile, cuda-graph, eager): its step time,
  its first call (compilation or capture), the mode that really ran, the fallbacks taken, and how
  many text tokens agree with eager's and with the reference's;
* the fallback chain: a step that can be neither compiled nor captured must end in eager, correct,
  with one fallback per mode given up (in a process of its own: a failed capture may leave the
  CUDA context unusable);
* ``moshi transcribe --device cuda`` on 60 s of audio with an STT-1B-shaped checkpoint: its
  real-time factor, as a user gets it (the first step's compilation included).

"peak GB" is the most GPU memory allocated while a model steps, with everything then on the GPU
(the reference's weights, which our bf16 model shares, included).

The int8 and int4 steps run as CUDA graphs, not compiled: compiling each 7B model again would
take minutes; the compiled step is measured on bf16.

    python benchmarks/gpu.py                 # about 5 minutes on an H100
    python benchmarks/gpu.py --skip-compile  # without torch.compile (its first call compiles for minutes)
    python benchmarks/gpu.py --quick         # small shapes: checks that the code runs
    python benchmarks/gpu.py --json
    python benchmarks/gpu.py --quick --device cpu   # a dry run of the same code without a GPU

Without a CUDA GPU it says "no CUDA GPU: nothing to check" and exits with status 1: a check that
did not run must not read as one that passed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# The reference runs as it does by default on a GPU: with its CUDA graphs (the other benchmarks,
# CPU only, turn them off).
os.environ.setdefault("NO_CUDA_GRAPH", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NO_GPU = "no CUDA GPU: nothing to check"
MODES = ("compile", "cuda-graph", "eager")
# The environment that makes LMGen pick each step mode first (engine/compile.py's escape hatches).
MODE_ENV = {"compile": {"MOSHI_NO_COMPILE": "0", "MOSHI_NO_CUDA_GRAPH": "0"},
            "cuda-graph": {"MOSHI_NO_COMPILE": "1", "MOSHI_NO_CUDA_GRAPH": "0"},
            "eager": {"MOSHI_NO_COMPILE": "1", "MOSHI_NO_CUDA_GRAPH": "1"}}
QUANT_MODE = "cuda-graph"  # what the int8 and int4 steps run as


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: only checks that the code runs")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled step mode")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and mode (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of the same code (every mode runs eager), for tests")
    parser.add_argument("--fallback-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    return args


def step_bytes(cfg, mode: str | None) -> int:
    """The weights one step of this architecture reads in ``mode`` (None: bf16) on a GPU, counted on
    a model built on the meta device (nothing allocated)."""
    from engine import quant
    from engine.moshi.model import LMModel
    from floor import weight_bytes_per_step

    with torch.device("meta"):
        model = LMModel(cfg).to(torch.bfloat16)
        if mode is not None:
            quant.replace_linears(model, quant.quantized_linear_names(model), mode, torch.bfloat16)
    return weight_bytes_per_step(model)


def floor_figures(ours_ms: float, nbytes: int, bandwidth_gbs: float) -> dict[str, float]:
    from floor import floor_ms

    floor = floor_ms(nbytes, bandwidth_gbs)
    return {"gb_per_step": round(nbytes / 1e9, 3), "floor_ms": round(floor, 3),
            "floor_ratio": round(ours_ms / floor, 3)}


def agreement(tokens: list, other: list) -> float:
    """The fraction of steps whose text tokens agree (steps that answered nothing left out)."""
    pairs = [(a, b) for a, b in zip(tokens, other) if a is not None and b is not None]
    return round(sum(a == b for a, b in pairs) / len(pairs), 3) if pairs else 0.0


def format_table(results: dict) -> str:
    lines = [f"device: {results['device']}",
             f"read bandwidth: {results['bandwidth_gbs']:.0f} GB/s",
             f"{'7B step':10s} {'GB/step':>8s} {'floor ms':>9s} {'ours ms':>9s} {'ref ms':>9s} {'ours/ref':>9s} "
             f"{'ours/floor':>10s} {'model GB':>9s} {'peak GB':>8s}  runs as"]
    for mode in ("bf16", "int8", "int4"):
        row = results.get(f"moshi7b_step_{mode}")
        if row:
            lines.append(f"{mode:10s} {row['gb_per_step']:8.2f} {row['floor_ms']:9.2f} {row['ours_ms']:9.2f} "
                         f"{row['reference_ms']:9.2f} {row['ratio']:9.3f} {row['floor_ratio']:10.2f} "
                         f"{row['model_gb']:9.2f} {row['peak_gb']:8.2f}  {row['ran_as']}")
    lines.append(f"{'bf16 mode':10s} {'ours ms':>9s} {'1st call ms':>12s} {'ran as':>11s} {'= eager':>8s} "
                 f"{'= ref':>6s}  fallbacks")
    for mode, row in results.get("step_modes", {}).items():
        lines.append(f"{mode:10s} {row['ours_ms']:9.2f} {row['first_call_ms']:12.0f} {row['ran_as']:>11s} "
                     f"{row['tokens_agree_with_eager']:8.2f} {row['tokens_agree_with_reference']:6.2f}  "
                     f"{'; '.join(row['fallbacks']) or 'none'}")
    chain = results.get("fallback_chain")
    if chain:
        lines.append(f"fallback chain: {' -> '.join(chain['modes'])}: ended in {chain['ended_in']} after "
                     f"{chain['fallbacks']} fallback(s), results {'correct' if chain['correct'] else 'WRONG'}")
    for name, row in results.items():
        if name.startswith("transcribe_rtf_"):
            lines.append(f"{name}: real-time factor {row['ours_rtf']:.4f}")
    lines.append(f"took {results['seconds']:.0f} s")
    return "\n".join(lines)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_gb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def gpu_read_bandwidth(device: torch.device, gibibytes: int = 2, repeats: int = 10) -> float:
    if device.type != "cuda":
        from floor import read_bandwidth

        return read_bandwidth(1, 256)
    data = torch.ones(gibibytes << 29, dtype=torch.bfloat16, device=device)
    data.sum()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        data.sum()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return data.nbytes / statistics.median(times) / 1e9


def time_steps(gen, codes: torch.Tensor) -> tuple[list[float], list[int | None]]:
    """Per-step wall times (ms, the GPU's work included) and the text token of each step."""
    times, tokens = [], []
    with torch.no_grad(), gen.streaming(1):
        for step_codes in codes:
            sync(codes.device)
            start = time.perf_counter()
            out = gen.step(step_codes)
            sync(codes.device)
            times.append((time.perf_counter() - start) * 1000)
            tokens.append(None if out is None else int(out[0, 0, 0]))
    return times, tokens


class Check:
    """The run, phase by phase, each phase's start told on stderr with the time so far (a run cut
    short by a time limit still says where it was)."""

    def __init__(self, args: argparse.Namespace):
        from engine.moshi.model import LMConfig

        self.args = args
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.cfg = LMConfig.moshi_7b()
        if args.quick:
            self.cfg = dataclasses.replace(self.cfg, num_layers=2, depformer_num_layers=1, context=100)
        if args.quick and self.device.type == "cpu":  # the reference's initialisation is slow on a CPU
            self.cfg = dataclasses.replace(self.cfg, dim=256, num_heads=4, ffn_hidden=704, text_card=1000,
                                           depformer_dim=128, depformer_num_heads=2, depformer_ffn_hidden=352)
        self.warmup = 3  # a CUDA graph is captured at the third call
        generator = torch.Generator().manual_seed(0)
        self.codes = torch.randint(0, self.cfg.card, (self.warmup + args.steps, 1, self.cfg.n_q - self.cfg.dep_q, 1),
                                   generator=generator).to(self.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU (dry run)"
        self.results: dict = {"device": name, "quick": args.quick}

    def phase(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    def timed(self, make_gen: Callable) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = make_gen()
        times, tokens = time_steps(gen, self.codes)
        steady = times[self.warmup:]
        return {"ours_ms": round(statistics.median(steady), 3), "first_call_ms": round(times[0], 1),
                "p90_ms": round(sorted(steady)[int(0.9 * (len(steady) - 1))], 3),
                "peak_gb": round(torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda"
                                 else 0.0, 2), "tokens": tokens,
                "ran_as": getattr(gen, "acceleration", "reference"), "fallbacks": list(getattr(gen, "fallbacks", []))}

    def run(self) -> dict:
        from moshi.models.lm import LMGen as ReferenceGen
        from moshi.models.loaders import get_moshi_lm

        from engine.moshi.generate import LMGen, Sampling
        from engine.moshi.loading import load_lm_state

        self.phase("read bandwidth")
        bandwidth = gpu_read_bandwidth(self.device)
        self.results["bandwidth_gbs"] = round(bandwidth, 1)

        self.phase("the reference's 7B (bf16, random initialisation) and its steps")
        before = allocated_gb(self.device)
        reference = get_moshi_lm(None, self.cfg.to_dict(), device=self.device, dtype=torch.bfloat16)
        reference_gb = allocated_gb(self.device) - before
        ref = self.timed(lambda: ReferenceGen(reference, use_sampling=False))
        state = reference.state_dict()

        def ours(quantize: str | None):
            return load_lm_state(dict(state), "the reference's random weights", self.cfg, self.device,
                                 torch.bfloat16, quantize)

        lm = ours(None)  # the reference's tensors, not a copy
        modes = {}
        for mode in [m for m in MODES if not (m == "compile" and self.args.skip_compile)][::-1]:
            self.phase(f"our bf16 7B, step mode {mode}")
            with environment(MODE_ENV[mode]):
                modes[mode] = self.timed(lambda: LMGen(lm, Sampling.greedy()))
        for row in modes.values():
            row["tokens_agree_with_eager"] = agreement(row["tokens"], modes["eager"]["tokens"])
            row["tokens_agree_with_reference"] = agreement(row["tokens"], ref["tokens"])
        best = modes["compile" if "compile" in modes else "cuda-graph"]
        self.results["moshi7b_step_bf16"] = self.row(best, ref, step_bytes(self.cfg, None), bandwidth, reference_gb)
        self.results["step_modes"] = {mode: {k: v for k, v in row.items() if k != "tokens"}
                                      for mode, row in modes.items()}
        del lm
        for quantize in ("int8", "int4"):
            self.phase(f"our {quantize} 7B (quantized from the same weights), as {QUANT_MODE}")
            before = allocated_gb(self.device)
            lm = ours(quantize)
            model_gb = allocated_gb(self.device) - before
            with environment(MODE_ENV[QUANT_MODE]):
                row = self.timed(lambda: LMGen(lm, Sampling.greedy()))
            row["tokens_agree_with_reference"] = agreement(row["tokens"], ref["tokens"])
            self.results[f"moshi7b_step_{quantize}"] = self.row(row, ref, step_bytes(self.cfg, quantize), bandwidth,
                                                                model_gb)
            del lm
        del reference, state
        gc.collect()  # the generators' captured graphs hold memory pools of their own
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

        self.phase("the fallback chain, in a process of its own")
        self.results["fallback_chain"] = fallback_chain_in_child(self.device)
        seconds = 5 if self.args.quick else 60
        steps = "cuda-graph" if self.args.skip_compile else "compile"
        self.phase(f"moshi transcribe --device {self.device.type} on {seconds} s of audio (STT-1B shapes), steps: {steps}")
        with environment(MODE_ENV[steps]):
            rtf = transcribe_rtf(seconds, self.args.quick, self.device)
        self.results[f"transcribe_rtf_{seconds}s"] = {"ours_rtf": rtf, "steps": steps}
        self.results["seconds"] = round(time.perf_counter() - self.started, 1)
        return self.results

    @staticmethod
    def row(ours: dict, ref: dict, nbytes: int, bandwidth: float, model_gb: float) -> dict:
        figures = {k: v for k, v in ours.items() if k != "tokens"}
        figures.update({"reference_ms": ref["ours_ms"], "ratio": round(ours["ours_ms"] / ref["ours_ms"], 3),
                        "reference_peak_gb": ref["peak_gb"], "model_gb": round(model_gb, 2)})
        figures.update(floor_figures(ours["ours_ms"], nbytes, bandwidth))
        return figures


def _branchy(x: torch.Tensor) -> torch.Tensor:
    # A branch on a value read back from the GPU: torch.compile(fullgraph=True) cannot trace it and
    # a CUDA graph cannot capture it.
    return x * 2 if x.sum().item() > 0 else x - 1


def fallback_chain(device: torch.device) -> dict:
    from engine.compile import AcceleratedStep, step_modes

    modes = step_modes(device)
    step = AcceleratedStep(_branchy, "fallback check", modes)
    x = torch.ones(16, device=device)
    outs = [step(x) for _ in range(4)]  # a graph is captured at the third call
    correct = all(torch.equal(out, x * 2) for out in outs)
    return {"modes": modes, "ended_in": step.mode, "fallbacks": len(step.fallbacks), "reasons": step.fallbacks,
            "correct": correct and step.mode == "eager" and len(step.fallbacks) == len(modes) - 1}


def fallback_chain_in_child(device: torch.device) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MOSHI_NO_COMPILE", "MOSHI_NO_CUDA_GRAPH")}
    result = subprocess.run([sys.executable, __file__, "--fallback-child", "--device", device.type],
                            capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        return {"modes": [], "ended_in": "a crash", "fallbacks": 0, "correct": False,
                "reasons": [result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def transcribe_rtf(seconds: int, quick: bool, device: torch.device) -> float:
    import soundfile
    from pipeline import RATE, cli_rtf, speechlike, write_checkpoint

    from engine.moshi.model import LMConfig

    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    with tempfile.TemporaryDirectory(prefix="moshi-gpu-") as root:
        folder = write_checkpoint(Path(root) / "stt", cfg)
        audio = Path(root) / "talk.wav"
        soundfile.write(audio, speechlike(seconds).numpy(), RATE, subtype="FLOAT")
        return round(cli_rtf(folder, audio, None, pipelined=False, device=device.type), 4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    if args.fallback_child:
        print(json.dumps(fallback_chain(torch.device(args.device))))
        return 0
    results = Check(args).run()
    print(json.dumps(results) if args.json else format_table(results))
    return 0 if results["fallback_chain"]["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
