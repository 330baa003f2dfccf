"""The quantized linears' CPU kernels, and Kyutai's candle q8 checkpoint (Q8_0 GGUF) beside
``--quantize int8``, 1 torch thread.

* ``<kind>_layer_7b_m<M>``: M bf16 input rows (M conversations) through all four linears of one
  temporal layer of Moshi 7B (4096 wide, FFN 11264), calls of the kinds compared alternating:
  ``q8_0`` (``BlockInt8Linear`` on our native kernel) against ``Int8Linear`` (``--quantize int8``),
  each as the model runs it; ``int8``: ``Int8Linear`` as the model runs it against oneDNN's int8
  matmul (what ``--quantize int8`` ran before our int8 path), ``q8_0_vs_onednn`` Q8_0 against it; ``q8_0_old``: Q8_0's PyTorch path (each code split into two int4 halves for
  ``_weight_int4pack_mm_for_cpu``, what an install without our kernels runs) against
  ``--quantize int8``; ``int4`` (``--quantize int4``, groups of 128) and MLX's ``q4`` (groups of
  32) and ``q8`` (groups of 64) on our kernel against the same weights on PyTorch's int4 kernel;
  ``*_vs_exact``: our kernel as the model runs it against the same with ``--exact``'s unquantized
  activations; ``*_avx2``: our AVX2 build on this CPU.
* ``candle_q8_load`` / ``candle_q8_peak_rss``: a mid-size LM (about 170 M values) loaded in a fresh
  process from its q8 GGUF, against the same weights' official bf16 file loaded with
  ``--quantize int8``; RSS is the rise of the high-water mark over the process before loading.
  ``candle_q8_rss_vs_file``: that rise against the GGUF's size (the reference column is the size).
* ``candle_q8_logit_error``: the block kernel's text logits against the exact fp32 path on the same file.

    python benchmarks/formats.py [--quick] [--json]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the candle file writer of the tests

import torch  # noqa: E402
from common import run_command_line, summary  # noqa: E402

from engine.moshi.loading import load_lm  # noqa: E402
from engine.moshi.model import LMConfig  # noqa: E402
from engine import kernels  # noqa: E402
from engine.quant import AffineLinear, BlockInt8Linear, Int8Linear, exact_activations  # noqa: E402

# (out, in) of one temporal layer of Moshi 7B: fused QKV, output, gated FFN in and out.
LAYER_7B = ((12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264))
MID_SIZE = dataclasses.replace(LMConfig.moshi_7b(), dim=1024, num_heads=8, num_layers=4, ffn_hidden=2816,
                               text_card=8000, depformer_dim=512, depformer_num_heads=8, depformer_num_layers=2,
                               depformer_ffn_hidden=1408)


def _q8_0(out_features: int, in_features: int, generator: torch.Generator) -> BlockInt8Linear:
    q8 = BlockInt8Linear(in_features, out_features, torch.bfloat16)
    q8.weight.data = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    q8.scales.data = (torch.rand(out_features, in_features // 32, generator=generator) / 1000).half()
    q8.prepare()
    return q8


def _int8(out_features: int, in_features: int, generator: torch.Generator) -> Int8Linear:
    int8 = Int8Linear(in_features, out_features, torch.bfloat16)
    int8.weight.data = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    int8.weight_scb.data = torch.rand(out_features, generator=generator)
    int8.prepare()
    return int8


def _affine(bits: int, group: int):
    def make(out_features: int, in_features: int, generator: torch.Generator) -> AffineLinear:
        layer = AffineLinear(in_features, out_features, bits, group, torch.bfloat16)
        layer.weight.data = torch.randint(0, 256, (out_features, in_features * bits // 8), dtype=torch.uint8,
                                          generator=generator)
        layer.scales.data = (torch.rand(out_features, in_features // group, generator=generator) / 1000).bfloat16()
        layer.biases.data = -8 * layer.scales.data
        layer.prepare()
        return layer
    return make


class _OnVariant:
    """A layer's product on one named build of our kernel, with the layer's own codes."""

    def __init__(self, layer, variant: str):
        self.layer, self.variant = layer, variant

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, BlockInt8Linear):
            return kernels.grouped_matmul(x, layer.weight, 8, 32, layer.scales, None, signed=True, variant=self.variant)
        return kernels.grouped_matmul(x, layer.weight, layer.bits, layer.group_size, layer.scales, layer.biases,
                                      variant=self.variant)


# comparison -> (ours, reference), each (a maker of one linear from (out, in, generator), how):
# how "" as the model runs it, "old" built with our kernels off (PyTorch's path), "exact" with
# --exact's activations, "onednn" an int8 layer on oneDNN's matmul, "avx2" our AVX2 build
COMPARISONS = {
    "q8_0": ((_q8_0, ""), (_int8, "")),
    "int8": ((_int8, ""), (_int8, "onednn")),
    "q8_0_vs_onednn": ((_q8_0, ""), (_int8, "onednn")),
    "q8_0_old": ((_q8_0, "old"), (_int8, "")),
    "q8_0_vs_exact": ((_q8_0, ""), (_q8_0, "exact")),
    "int4": ((_affine(4, 128), ""), (_affine(4, 128), "old")),
    "int4_vs_exact": ((_affine(4, 128), ""), (_affine(4, 128), "exact")),
    "mlx_q4": ((_affine(4, 32), ""), (_affine(4, 32), "old")),
    "mlx_q8": ((_affine(8, 64), ""), (_affine(8, 64), "old")),
    "q8_0_avx2": ((_q8_0, "avx2"), (_int8, "")),
    "int4_avx2": ((_affine(4, 128), "avx2"), (_affine(4, 128), "old")),
}


def _build(maker, how: str, shape: tuple[int, int]):
    generator = torch.Generator().manual_seed(0)
    if how == "old":
        with kernels.disabled():
            return maker(*shape, generator)
    layer = maker(*shape, generator)
    if how == "exact":
        exact_activations(layer)
    elif how == "onednn":
        layer.prepare("onednn")
    return _OnVariant(layer, how) if how not in ("", "exact", "onednn") else layer


def time_comparison(name: str, shapes, rows: int, repeats: int) -> dict[str, float] | None:
    """Median ms of ``rows`` bf16 input rows through all ``shapes``, ours and the reference, calls alternating."""
    ours, reference = COMPARISONS[name]
    # None where this install lacks the kernel that ours needs
    if (ours[1] != "old" and kernels.chosen_variant() is None) or (
            ours[1] == "avx2" and "avx2" not in kernels.runnable_variants()):
        return None
    sides = [[_build(maker, how, shape) for shape in shapes] for maker, how in (ours, reference)]
    inputs = [torch.randn(rows, shape[1]).bfloat16() for shape in shapes]
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for repeat in range(repeats + 2):
            for side, layers in enumerate(sides):
                start = time.perf_counter()
                for layer, x in zip(layers, inputs):
                    layer(x)
                if repeat >= 2:  # warm-up
                    times[side].append((time.perf_counter() - start) * 1000)
    return summary(*times)


def _rss_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def _load_child(path: str, cfg_json: str, quantize: str) -> None:
    """In a fresh process: load; print the load time and the rise of the peak RSS as JSON."""
    import gguf  # noqa: F401 (the readers' own code is not the checkpoint's memory)
    import safetensors.torch  # noqa: F401

    from engine.moshi.model import LMModel

    torch.set_num_threads(1)
    cfg = LMConfig(**json.loads(cfg_json))
    with torch.device("meta"):  # torch's one-time set-up of the meta device (~65 MB), either loader's
        LMModel(LMConfig.tiny_moshi())
    before = _rss_mb("VmRSS:")
    start = time.perf_counter()
    load_lm(Path(path), cfg, quantize=None if quantize == "none" else quantize)
    print(json.dumps({"load_ms": (time.perf_counter() - start) * 1000, "rss_mb": _rss_mb("VmHWM:") - before}))


def load_figures(folder: Path, cfg: LMConfig) -> dict:
    from candle_support import rust_layout, write_q8_gguf
    from safetensors.torch import save_file

    from engine.moshi.tiny import random_lm_state

    state = random_lm_state(cfg, seed=0)
    official, gguf = folder / "official.safetensors", folder / "model.q8.gguf"
    save_file(state, official)
    write_q8_gguf(gguf, rust_layout(state, cfg))
    del state

    def child(path: Path, quantize: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--load-child", str(path), json.dumps(dataclasses.asdict(cfg)),
                              quantize], capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(out.stdout.strip().splitlines()[-1])

    q8, int8 = child(gguf, "none"), child(official, "int8")
    file_mb = gguf.stat().st_size / 2**20
    return {
        "candle_q8_load": summary([q8["load_ms"]], [int8["load_ms"]]),
        "candle_q8_peak_rss": {"ours_mb": round(q8["rss_mb"], 1), "reference_mb": round(int8["rss_mb"], 1),
                               "ratio": round(q8["rss_mb"] / int8["rss_mb"], 3)},
        "candle_q8_rss_vs_file": {"ours_mb": round(q8["rss_mb"], 1), "reference_mb": round(file_mb, 1),
                                  "ratio": round(q8["rss_mb"] / file_mb, 3)},
        "candle_q8_logit_error": {"relative_error": _logit_error(gguf, cfg)},
    }


def _logit_error(path: Path, cfg: LMConfig, steps: int = 8) -> float:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=generator)
    logits = []
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_lm(path, cfg, dtype=dtype)
        with torch.no_grad(), lm.streaming(1):
            logits.append(torch.cat([lm.forward_text(tokens[:, :, t:t + 1])[1].float() for t in range(steps)]))
    exact, fast = logits
    return round(float((fast - exact).norm() / exact.norm()), 5)


def run(quick: bool) -> dict[str, dict]:
    shapes = tuple((out // 8, inp // 8) for out, inp in LAYER_7B) if quick else LAYER_7B
    repeats = 3 if quick else 15
    figures = {}
    for rows in (1, 4, 8):
        for name in COMPARISONS:
            figure = None if name.endswith("avx2") and rows > 1 else time_comparison(name, shapes, rows, repeats)
            if figure is not None:
                figures[f"{name}_layer_7b_m{rows}"] = figure
    cfg = dataclasses.replace(MID_SIZE, dim=256, num_heads=2, ffn_hidden=672, text_card=500, depformer_dim=64,
                              depformer_num_heads=1, depformer_ffn_hidden=176) if quick else MID_SIZE
    with tempfile.TemporaryDirectory(prefix="moshi-bench-") as folder:
        figures.update(load_figures(Path(folder), cfg))
    return figures


# What the table's reference column is, under it.
NOTE = ("reference column: q8_0*: our --quantize int8; int4*, mlx_*: the same weights on PyTorch's int4 kernel "
        "(our kernels off); candle_q8_*: --quantize int8 (rss_vs_file: the GGUF file's size)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-child":
        _load_child(*sys.argv[2:5])
        return
    run_command_line(__doc__, "small shapes: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
