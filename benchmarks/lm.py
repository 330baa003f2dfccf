"""LM step time, load time and memory, ours against the reference, random weights at real shapes, 1 torch thread.

Both implementations load the same safetensors file (memory-mapped, so the weights are in RAM
once) and step the same user codes; calls alternate so that both see the same machine load.
The reference has no CPU int8 path (its q8 needs bitsandbytes, GPU only), so our int8 and int4
figures are compared with the reference's bf16 step. Steps are timed at the start of a stream;
on CPU our models attend only over what the stream has heard so far (the reference always over
its whole KV ring), so ``*_full_context`` repeats our steps with the attention over the whole ring.
Load time and peak RSS are measured in a fresh process per implementation (load, then two steps).

    python benchmarks/lm.py              # STT-1B (bf16, int8, int4), Moshi-7B depformer (bf16, int8, int4)
    python benchmarks/lm.py --full-7b    # and the full Moshi-7B bf16 step: writes a 15 GB file, needs ~20 GB RAM
    python benchmarks/lm.py --quick      # small shapes: checks that the code runs
    python benchmarks/lm.py --json
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import run_command_line, summary  # noqa: E402
from floor import floor_row, read_bandwidth, weight_bytes_per_step  # noqa: E402

from engine.moshi.generate import LMGen, Sampling  # noqa: E402
from engine.moshi.loading import load_lm  # noqa: E402
from engine.moshi.model import LMConfig, LMModel  # noqa: E402
from engine.transformer import Attention  # noqa: E402

QUANT_MODES = ("int8", "int4")


def write_random_weights(path: Path, cfg: LMConfig, seed: int = 0, text_vocab: int | None = None) -> None:
    """The official bf16 layout (fused attention) with N(0, 1/fan_in) weights, written tensor by
    tensor: the model is never whole in memory, so a 15 GB file needs no 15 GB of RAM.
    ``text_vocab``: the text head's rows from there on are zero, so that greedy decoding stays
    within a smaller tokenizer's pieces."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LMModel(cfg).state_dict().items()}
    for split, fused in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
        for name in [n for n in shapes if split in n]:
            prefix = name.split(split)[0] + fused
            rows, cols = shapes.pop(name)
            shapes[prefix] = (shapes.get(prefix, (0, cols))[0] + rows, cols)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            rows = shape[0] if len(shape) == 2 else 1
            chunk = max(1, (1 << 24) // max(1, torch.Size(shape).numel() // rows))
            for start in range(0, rows, chunk):
                part = (min(chunk, rows - start), *shape[1:]) if len(shape) == 2 else shape
                noise = torch.randn(part, generator=generator)
                value = 1 + 0.1 * noise if name.endswith(".alpha") else noise / shape[-1] ** 0.5
                if name == "text_linear.weight" and text_vocab is not None:
                    value[max(0, text_vocab - start):] = 0
                out.write(value.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def _reference_gen(path: Path, cfg: LMConfig):
    from moshi.models.lm import LMGen as ReferenceGen
    from moshi.models.loaders import get_moshi_lm

    return ReferenceGen(get_moshi_lm(str(path), cfg.to_dict(), device="cpu", dtype=torch.bfloat16),
                        use_sampling=False)


def _ours_gen(path: Path, cfg: LMConfig, quantize: str | None) -> LMGen:
    return LMGen(load_lm(path, cfg, dtype=torch.bfloat16, quantize=quantize), Sampling.greedy())


def _timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return (time.perf_counter() - start) * 1000


def _codes(cfg: LMConfig, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.card, (steps, 1, cfg.n_q - cfg.dep_q, 1), generator=generator)


def _attend_full_ring(gen: LMGen) -> None:
    """On CPU our models attend only over the ring slots written so far (bf16: in whole blocks
    of the fused kernel), so a step early in a stream is cheaper than one after ``context`` steps.
    Marking the rings as filled makes the next steps attend over all slots (the unwritten ones
    masked out), which costs what a full ring costs, without stepping through the whole context
    first. The rings are filled with noise: a ring of fresh zeros is the kernel's shared zero
    page, which reads from cache and would time a full ring as fast as an empty one."""
    for module in gen.lm.modules():
        if isinstance(module, Attention) and module.state is not None and module.cfg.context:
            module.state.cache.normal_()
            module.state.step = max(module.state.step, module.state.capacity)


def time_steps(gens: dict, cfg: LMConfig, warmup: int, steps: int, depformer_only: bool = False,
               full_ring: bool = False) -> dict[str, list]:
    """Per-call times of each generator's step (or depformer step), calls alternating between them."""
    codes = _codes(cfg, warmup + steps)
    hidden = torch.randn(1, 1, cfg.dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    text = torch.tensor([cfg.text_padding_id])
    times: dict[str, list] = {name: [] for name in gens}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for gen in gens.values():
            stack.enter_context(gen.streaming(1))
            if full_ring and isinstance(gen, LMGen):
                _attend_full_ring(gen)
        for t in range(warmup + steps):
            for name, gen in gens.items():
                if depformer_only:
                    ms = _timed(gen.depformer_step, text, hidden)
                else:
                    ms = _timed(gen.step, codes[t])
                if t >= warmup:
                    times[name].append(ms)
    return times


def logit_errors(lms: dict, cfg: LMConfig, steps: int) -> dict[str, float]:
    """Relative error of each quantized model's text logits against ours in bf16, same inputs."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=generator)
    logits = {}
    with torch.no_grad():
        for name, lm in lms.items():
            with lm.streaming(1):
                logits[name] = torch.cat([lm.forward_text(tokens[:, :, t:t + 1])[1].float() for t in range(steps)])
    base = logits["bf16"]
    return {name: round(float((value - base).norm() / base.norm()), 5) for name, value in logits.items()
            if name != "bf16"}


def _load_child(impl: str, path: str, cfg_json: str, quantize: str) -> None:
    """In a fresh process: load, step twice, print load time and peak RSS as one JSON line."""
    torch.set_num_threads(1)
    cfg = LMConfig(**json.loads(cfg_json))
    start = time.perf_counter()
    gen = _reference_gen(Path(path), cfg) if impl == "reference" else _ours_gen(
        Path(path), cfg, None if quantize == "none" else quantize)
    load_ms = (time.perf_counter() - start) * 1000
    codes = _codes(cfg, 2)
    with gen.streaming(1), torch.no_grad():
        first_ms = _timed(gen.step, codes[0])
        gen.step(codes[1])
    print(json.dumps({"load_ms": load_ms, "first_step_ms": first_ms, "rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's high-water RSS. Not ru_maxrss: that one starts from the parent's RSS at fork."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_and_memory(path: Path, cfg: LMConfig, prefix: str, modes: tuple[str, ...]) -> dict[str, dict]:
    def child(impl: str, quantize: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--load-child", impl, str(path),
                              json.dumps(dataclasses.asdict(cfg)), quantize],
                             capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(out.stdout.strip().splitlines()[-1])

    reference = child("reference", "none")
    figures = {}
    for mode in modes:
        ours = child("ours", "none" if mode == "bf16" else mode)
        figures[f"{prefix}_load_{mode}"] = summary([ours["load_ms"]], [reference["load_ms"]])
        figures[f"{prefix}_first_step_{mode}"] = summary([ours["first_step_ms"]], [reference["first_step_ms"]])
        figures[f"{prefix}_peak_rss_{mode}"] = {"ours_mb": round(ours["rss_mb"]), "reference_mb": round(
            reference["rss_mb"]), "ratio": round(ours["rss_mb"] / reference["rss_mb"], 3)}
    return figures


def bench_stt(folder: Path, quick: bool) -> dict:
    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    warmup, steps = (1, 3) if quick else (3, 20)
    path = folder / "stt1b.safetensors"
    write_random_weights(path, cfg)
    figures = load_and_memory(path, cfg, "stt1b", ("bf16",) + QUANT_MODES)
    gens = {"reference": _reference_gen(path, cfg), "bf16": _ours_gen(path, cfg, None)}
    gens.update({mode: _ours_gen(path, cfg, mode) for mode in QUANT_MODES})
    times = time_steps(gens, cfg, warmup, steps)
    for mode in ("bf16",) + QUANT_MODES:
        figures[f"stt1b_step_{mode}"] = summary(times[mode], times["reference"])
    full = time_steps({mode: gens[mode] for mode in ("bf16", "int8")}, cfg, warmup, steps, full_ring=True)
    for mode in ("bf16", "int8"):
        figures[f"stt1b_step_{mode}_full_context"] = summary(full[mode], times["reference"])
    errors = logit_errors({mode: gens[mode].lm for mode in ("bf16",) + QUANT_MODES}, cfg, 4 if quick else 16)
    for mode, error in errors.items():
        figures[f"stt1b_logit_error_{mode}"] = {"relative_error": error}
    return figures


def bench_depformer(folder: Path, quick: bool) -> dict:
    # The temporal transformer is not run: one layer (the reference cannot stream none).
    cfg = dataclasses.replace(LMConfig.moshi_7b(), num_layers=1)
    if quick:
        cfg = dataclasses.replace(cfg, dim=512, text_card=1000, depformer_num_layers=1)
    warmup, steps = (1, 3) if quick else (3, 20)
    path = folder / "depformer.safetensors"
    write_random_weights(path, cfg)
    gens = {"reference": _reference_gen(path, cfg), "bf16": _ours_gen(path, cfg, None),
            **{mode: _ours_gen(path, cfg, mode) for mode in QUANT_MODES}}
    times = time_steps(gens, cfg, warmup, steps, depformer_only=True)
    return {"moshi7b_depformer_step": summary(times["bf16"], times["reference"]),
            **{f"moshi7b_depformer_step_{mode}": summary(times[mode], times["reference"]) for mode in QUANT_MODES}}


def bench_moshi_7b(folder: Path, quick: bool) -> dict:
    """One model at a time, not alternating: two 1.6 GB KV caches beside the 15 GB of weights
    would not fit a 24 GB machine. The bf16 models share the file's pages."""
    cfg = LMConfig.moshi_7b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2, depformer_num_layers=1, context=100)
    warmup, steps = (1, 2) if quick else (1, 5)
    path = folder / "moshi7b.safetensors"
    write_random_weights(path, cfg)
    figures = load_and_memory(path, cfg, "moshi7b", ("bf16", "int8"))
    times = {}
    for name, load in (("reference", lambda: _reference_gen(path, cfg)), ("bf16", lambda: _ours_gen(path, cfg, None))):
        gen = load()
        times.update(time_steps({name: gen}, cfg, warmup, steps))
        if name == "bf16":
            nbytes = weight_bytes_per_step(gen.lm)
        del gen
        gc.collect()
    # The int8 and int4 steps, with their floors, are floor.py's: it builds them without this file.
    figures["moshi7b_step_bf16"] = {**summary(times["bf16"], times["reference"]),
                                    **floor_row(times["bf16"], nbytes, read_bandwidth(1))}
    for mode in ("bf16", "int8"):
        full = time_steps({mode: _ours_gen(path, cfg, None if mode == "bf16" else mode)}, cfg, warmup, steps,
                          full_ring=True)
        figures[f"moshi7b_step_{mode}_full_context"] = summary(full[mode], times["reference"])
        gc.collect()
    return figures


def run(quick: bool, full_7b: bool = False) -> dict[str, dict[str, float]]:
    figures = {}
    with tempfile.TemporaryDirectory(prefix="moshi-bench-") as folder:
        for bench in (bench_stt, bench_depformer) + ((bench_moshi_7b,) if full_7b else ()):
            figures.update(bench(Path(folder), quick))
            gc.collect()
            for file in Path(folder).iterdir():  # a 15 GB file is not kept longer than needed
                file.unlink()
    return figures


# What the table's reference column is, under it.
NOTE = ("int8/int4 rows: the reference column is its bf16 step; it has no CPU int8 path")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-child":
        _load_child(*sys.argv[2:6])
        return
    run_command_line(__doc__, "small shapes: only checks that the code runs", run, NOTE, full_7b=True)


if __name__ == "__main__":
    main()
