"""Kyutai's MLX q8/q4 files against our ``--quantize int8/int4`` of the official bf16 file, 1 torch thread.

For each: load time and the peak RSS the load adds (against the file's size), each in a fresh
process; then the time of one temporal layer step and of a whole generator step, medians, the
two models' calls alternating so that both see the same machine load.
The files hold random weights at Moshi-7B's shapes, the MLX ones written directly in MLX's
layout (random codes, scales and biases: the format, not the values, sets the cost).

    python benchmarks/formats_mlx.py            # one temporal and one depth layer at 7B shapes
    python benchmarks/formats_mlx.py --full-7b  # the whole 7B (a 4.8 and an 8.2 GB file, 15 GB for bf16)
    python benchmarks/formats_mlx.py --quick    # small shapes: checks that the code runs
    python benchmarks/formats_mlx.py --json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import run_command_line, summary  # noqa: E402
from lm import _peak_rss_mb, time_steps, write_random_weights  # noqa: E402

from engine.moshi.generate import LMGen, Sampling  # noqa: E402
from engine.moshi.loading import load_lm  # noqa: E402
from engine.moshi.model import LMConfig  # noqa: E402

# Kyutai's MLX exports: bits -> group size
MLX_GROUPS = {8: 64, 4: 32}
# Each MLX file against the --quantize mode of the same size class.
VARIANTS = {"mlx-q8": "int8", "mlx-q4": "int4"}


def mlx_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """The MLX layout's tensors of a Moshi LM: name -> shape (norms 1-D, everything else quantizable)."""
    shapes = {"text_emb.weight": (cfg.text_card + 1, cfg.dim), "text_linear.weight": (cfg.text_card, cfg.dim),
              "out_norm.weight": (cfg.dim,)}
    shapes.update({f"audio_embs.{k}.weight": (cfg.card + 1, cfg.dim) for k in range(cfg.n_q)})

    def layer(prefix: str, dim: int, hidden: int) -> None:
        shapes.update({f"{prefix}.self_attn.in_proj.weight": (3 * dim, dim), f"{prefix}.self_attn.out_proj.weight": (dim, dim),
                       f"{prefix}.gating.linear_in.weight": (2 * hidden, dim), f"{prefix}.gating.linear_out.weight": (dim, hidden),
                       f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm2.weight": (dim,)})

    for i in range(cfg.num_layers):
        layer(f"transformer.layers.{i}", cfg.dim, cfg.ffn_hidden)
    for s in range(cfg.dep_q):
        p = f"depformer.slices.{s}"
        shapes.update({f"{p}.linear_in.weight": (cfg.depformer_dim, cfg.dim), f"{p}.linear_out.weight": (cfg.card, cfg.depformer_dim),
                       f"{p}.emb.weight": ((cfg.text_card if s == 0 else cfg.card) + 1, cfg.depformer_dim)})
        for i in range(cfg.depformer_num_layers):
            layer(f"{p}.transformer.layers.{i}", cfg.depformer_dim, cfg.depformer_ffn_hidden)
    return shapes


def write_mlx_file(path: Path, cfg: LMConfig, bits: int, seed: int = 0) -> None:
    """A random MLX affine file (weights ~ N(0, 1/in) in law), written a block of rows at a time."""
    group = MLX_GROUPS[bits]
    tensors = []  # (name, safetensors dtype, shape, row-block maker)
    for name, shape in mlx_shapes(cfg).items():
        if len(shape) == 1:
            # the depth slices' norms are copies of one another, as in Kyutai's exports
            tensors.append((name, "BF16", shape, lambda rows, g, n=shape[0]: torch.ones(n)))
            continue
        out, inputs = shape
        step = 1 / (inputs ** 0.5 * (1 << (bits - 1)))  # codes spread the law over ±2^(bits-1) steps
        module = name[:-len(".weight")]
        tensors.append((name, "U32", (out, inputs * bits // 32), lambda rows, g, n=inputs * bits // 32: torch.randint(
            0, 1 << 31, (rows, n), generator=g, dtype=torch.int64).to(torch.int32)))
        tensors.append((f"{module}.scales", "BF16", (out, inputs // group),
                        lambda rows, g, n=inputs // group, s=step: torch.full((rows, n), s)))
        tensors.append((f"{module}.biases", "BF16", (out, inputs // group),
                        lambda rows, g, n=inputs // group, s=step: torch.full((rows, n), -s * (1 << (bits - 1)))))
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        size = torch.Size(shape).numel() * (4 if dtype == "U32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape, make in tensors:
            rows = shape[0] if len(shape) == 2 else 1
            chunk = max(1, (1 << 22) // (torch.Size(shape).numel() // rows))
            for start in range(0, rows, chunk):
                block = make(min(chunk, rows - start), generator)
                block = block if dtype == "U32" else block.to(torch.bfloat16).view(torch.int16)
                out.write(block.numpy().tobytes())


def _rss_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _load(path: Path, cfg: LMConfig, variant: str):
    """An MLX file (``variant`` "mlx-q8", "mlx-q4") or the official file with ``variant`` as --quantize."""
    from engine.formats.mlx import load_mlx_lm

    if variant.startswith("mlx"):
        return load_mlx_lm(path, cfg.to_dict(), torch.device("cpu"), torch.bfloat16, None)
    return load_lm(path, cfg, dtype=torch.bfloat16, quantize=variant)


def _child(path: str, cfg_json: str, variant: str) -> None:
    """In a fresh process: the load's time and the peak RSS it adds; one JSON line."""
    torch.set_num_threads(1)
    cfg = LMConfig(**json.loads(cfg_json))
    before = _rss_mb()
    start = time.perf_counter()
    _load(Path(path), cfg, variant)
    load_ms = (time.perf_counter() - start) * 1000
    print(json.dumps({"load_ms": load_ms, "load_rss_mb": _peak_rss_mb() - before}))


def time_layers(lms: dict, cfg: LMConfig, steps: int) -> dict[str, list[float]]:
    """Per-call times of each model's first temporal layer on one step, calls alternating."""
    x = torch.randn(1, 1, cfg.dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in lms}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for lm in lms.values():
            stack.enter_context(lm.streaming(1))
        for t in range(steps + 1):
            for name, lm in lms.items():
                start = time.perf_counter()
                lm.transformer.layers[0](x)
                if t:  # the first call is a warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
    return times


def run(quick: bool, full_7b: bool = False) -> dict[str, dict[str, float]]:
    cfg = LMConfig.moshi_7b()
    if not full_7b:
        cfg = dataclasses.replace(cfg, num_layers=1, depformer_num_layers=1)
    if quick:
        cfg = dataclasses.replace(cfg, dim=512, ffn_hidden=1408, text_card=1000, context=100, depformer_dim=256,
                                  depformer_num_heads=4, depformer_ffn_hidden=704)
    steps = 3 if quick else 20
    figures = {}
    with tempfile.TemporaryDirectory(prefix="moshi-bench-mlx-") as folder:
        official = Path(folder) / "model.safetensors"
        write_random_weights(official, cfg)

        def child(path: Path, variant: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), json.dumps(dataclasses.asdict(cfg)),
                                  variant], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if out.returncode:
                raise RuntimeError(f"{variant} on {path.name} failed:\n{out.stderr}")
            return json.loads(out.stdout.strip().splitlines()[-1])

        for variant, mode in VARIANTS.items():
            mlx = Path(folder) / f"model.q{variant[len('mlx-q'):]}.safetensors"
            write_mlx_file(mlx, cfg, int(variant[len("mlx-q"):]))
            ours, theirs = child(mlx, variant), child(official, mode)
            figures[f"{variant}_load_vs_{mode}"] = summary([ours["load_ms"]], [theirs["load_ms"]])
            file_mb = mlx.stat().st_size / 2**20
            figures[f"{variant}_load_rss_vs_file"] = {"ours_mb": round(ours["load_rss_mb"]), "reference_mb": round(file_mb),
                                                      "ratio": round(ours["load_rss_mb"] / file_mb, 3)}
            lms = {variant: _load(mlx, cfg, variant), mode: _load(official, cfg, mode)}
            layers = time_layers(lms, cfg, steps)
            figures[f"{variant}_layer_vs_{mode}"] = summary(layers[variant], layers[mode])
            gens = {name: LMGen(lm, Sampling.greedy()) for name, lm in lms.items()}
            step = time_steps(gens, cfg, 1, steps)
            figures[f"{variant}_step_vs_{mode}"] = summary(step[variant], step[mode])
            del lms, gens
            mlx.unlink()
    return figures


# What the table's reference column is, under it.
NOTE = ("reference column: our --quantize of the official bf16 file; for *_load_rss_vs_file, the "
        "MLX file's size")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return
    run_command_line(__doc__, "small shapes: only checks that the code runs", run, NOTE, full_7b=True)


if __name__ == "__main__":
    main()
