"""Quantized LM paths, each against its own tolerance (they cannot be bit-exact with bf16).

The tolerances are the relative error of the logits against the bf16 model on the same inputs,
set about twice the values measured on these tiny random models (int8 ~3%, int4 ~22%: random
weights have no structure for 4 bits to keep, and every layer compounds the error).
"""

import contextlib
import subprocess
import sys

import pytest
import soundfile
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.loading import load_lm
from engine.moshi.model import LMConfig
from engine.moshi.tiny import random_lm_state
from engine.quant import AffineLinear, Int8Linear, dequantize, exact_activations, int4_groups
from engine.tiny import write_tiny_checkpoint
from engine import kernels, transformer
from engine.transformer import Attention, matmul_attention

from int8_support import rounding_bound

TOLERANCE = {"int8": 0.06, "int4": 0.4}


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _text_logits(lm, tokens):
    """Teacher-forced text logits [steps, text_card]: every model sees the same inputs."""
    with torch.no_grad(), lm.streaming(1):
        return torch.cat([lm.forward_text(tokens[:, :, t:t + 1])[1][0, 0] for t in range(tokens.shape[2])])


def _tokens(cfg, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=generator)
    return tokens


def _q8_state(cfg, seed=1):
    """A q8 file's tensors written as the reference's export does: per row of the fp16 weight,
    SCB = absmax (fp32) and CB = round(127 · W / SCB) (int8), under the split attention names."""
    state = random_lm_state(cfg, seed=seed, fused=False)
    for key in list(state):
        layer_linear = ".self_attn." in key or ".gating." in key
        head = key.startswith(("text_linear", "depformer_in.", "linears.", "extra_heads."))
        if key.endswith(".weight") and (layer_linear or head):
            weight = state[key].half().float()
            scb = weight.abs().amax(dim=1)
            state[key] = torch.round(weight * 127 / scb[:, None]).to(torch.int8)
            state[key + "_scb"] = scb
    return state


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["moshi", "stt"])
def test_quantized_logits_within_tolerance_of_bf16(lm_checkpoints, name, mode):
    cfg = LMConfig.tiny_moshi() if name == "moshi" else LMConfig.tiny_stt()
    plain = load_lm(lm_checkpoints[name], cfg)
    quantized = load_lm(lm_checkpoints[name], cfg, quantize=mode)
    linears = [m for m in quantized.modules() if isinstance(m, (Int8Linear, AffineLinear))]
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.transformer.modules())
    assert len(linears) >= 4 * cfg.num_layers + 1
    if mode == "int4":
        assert any(isinstance(m, AffineLinear) for m in linears)
    tokens = _tokens(cfg, 20)
    expected, got = _text_logits(plain, tokens), _text_logits(quantized, tokens)
    error = _relative(got, expected)
    print(f"{name} {mode}: relative logit error {error:.4f}")
    assert 0 < error < TOLERANCE[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_moshi_generates_with_its_depformer(lm_checkpoints, mode):
    cfg = LMConfig.tiny_moshi()
    gen = LMGen(load_lm(lm_checkpoints["moshi"], cfg, quantize=mode), Sampling.greedy())
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, cfg.card, (12, 2, cfg.n_q - cfg.dep_q, 1), generator=generator)
    with gen.streaming(2):
        outs = [gen.step(codes[t]) for t in range(12)]
    assert outs[0] is None
    frames = torch.cat(outs[1:], dim=2)
    assert frames.shape == (2, 1 + cfg.dep_q, 11)
    assert (frames[:, 0] >= 0).all() and (frames[:, 0] < cfg.text_card).all()
    assert (frames[:, 1:] >= 0).all() and (frames[:, 1:] < cfg.card).all()
    assert len(set(frames[0, 0].tolist())) > 1


@pytest.mark.parametrize("fused", [False, True], ids=["split-names", "fused-names"])
def test_official_q8_layout_loads_strictly_and_runs(lm_checkpoints, tmp_path, fused):
    cfg = LMConfig.tiny_moshi()
    state = _q8_state(cfg)
    if fused:  # the load hook's other spelling: in_proj_weight / in_proj_weight_scb
        for prefix in {k.split(".self_attn.")[0] for k in state if ".self_attn." in k}:
            for split, fused_name in (("in_projs", "in_proj_weight"), ("out_projs", "out_proj.weight")):
                for suffix in ("", "_scb"):
                    keys = sorted((k for k in state if k.startswith(f"{prefix}.self_attn.{split}.")
                                   and k.endswith(f".weight{suffix}")), key=lambda k: int(k.split(".")[-2]))
                    state[f"{prefix}.self_attn.{fused_name}{suffix}"] = torch.cat([state.pop(k) for k in keys])
    assert state["text_linear.weight_scb"].dtype == torch.float32
    path = tmp_path / "model.q8.safetensors"
    save_file(state, path)
    q8 = load_lm(path, cfg)
    assert isinstance(q8.text_linear, Int8Linear) and isinstance(q8.depformer.layers[0].gating[7].linear_out,
                                                                  Int8Linear)
    assert q8.emb[0].weight.dtype == torch.bfloat16
    # The same random weights in bf16: the q8 model is within int8's tolerance of them.
    plain = load_lm(lm_checkpoints["moshi"], cfg)
    tokens = _tokens(cfg, 20)
    assert _relative(_text_logits(q8, tokens), _text_logits(plain, tokens)) < TOLERANCE["int8"]
    with pytest.raises(CheckpointError, match="already quantized to int8"):
        load_lm(path, cfg, quantize="int4")


def test_q8_file_with_a_missing_scale_names_it(tmp_path):
    cfg = LMConfig.tiny_moshi()
    state = _q8_state(cfg)
    state.pop("linears.2.weight_scb")
    path = tmp_path / "broken.q8.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): linears\.2\.weight_scb"):
        load_lm(path, cfg)


def test_unknown_quantization_is_a_named_error(lm_checkpoints):
    with pytest.raises(CheckpointError, match="unknown quantization 'int3'"):
        load_lm(lm_checkpoints["moshi"], LMConfig.tiny_moshi(), quantize="int3")


@torch.no_grad()
def test_int8_linear_both_paths_against_its_dequantized_weight():
    torch.manual_seed(0)
    N, K = 96, 256
    weight = torch.randn(N, K)
    scb = weight.abs().amax(dim=1)
    codes = torch.round(weight * 127 / scb[:, None]).to(torch.int8)
    dequantized = codes.float() * scb[:, None] / 127
    x = torch.randn(3, 1, K)
    expected = F.linear(x, dequantized)
    cases = [("onednn", torch.bfloat16, 0.02), ("widen", torch.float32, 1e-6), ("weight-only", torch.float32, 1e-6)]
    for kernel, dtype, tolerance in cases:
        linear = Int8Linear(K, N, dtype)
        linear.weight.data, linear.weight_scb.data = codes.clone(), scb.clone()
        linear.prepare(kernel)
        got = linear(x.to(dtype))
        assert got.dtype == dtype and got.shape == (3, 1, N)
        assert _relative(got, expected) < tolerance, kernel


@torch.no_grad()
def test_int8_linear_native_kernel_within_the_rounding_of_its_activations():
    """Where the native kernels' int8 path is built: the default kernel, each product within the
    rounding of x to int8 a row at a time (then rounded to bf16); --exact moves it to the weight-only
    kernel, the product of x as it is."""
    torch.manual_seed(0)
    N, K = 96, 256
    scb = torch.rand(N) + 0.5
    codes = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    dequantized = codes.double() * (scb.double() / 127)[:, None]
    linear = Int8Linear(K, N, torch.bfloat16)
    linear.weight.data, linear.weight_scb.data = codes, scb
    linear.prepare()
    if not kernels.has_int8_path():
        assert linear.kernel != "native"
        pytest.skip("no int8 path on this CPU or build")
    assert linear.kernel == "native"
    x = torch.randn(3, 1, K).bfloat16()
    exact = x.double() @ dequantized.T
    error = (linear(x).double() - exact).abs()
    assert 0 < error.max() and (error <= rounding_bound(x, dequantized, K) + 2**-8 * exact.abs() + 1e-6).all()
    exact_activations(linear)
    assert linear.kernel == "weight-only"
    assert (linear(x).double() - exact).abs().max() < 2**-8 * exact.abs().max()


def _int4_layer(weight, group, dtype):
    N, K = weight.shape
    layer = AffineLinear(K, N, 4, group, dtype, "int4")
    codes, scales, biases = int4_groups(weight, group)
    layer.weight.data, layer.scales.data, layer.biases.data = codes, scales.to(dtype), biases.to(dtype)
    layer.prepare()
    return layer


@torch.no_grad()
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_native_kernel_is_the_dequantized_product(group):
    """bf16 on a CPU: by default, where the int8 path is built, within the rounding of the activations
    to int8 blocks; with ``exact_activations`` (``--exact``), the fp32 product with the dequantized
    weight, up to the order of the sums. Then rounded to bf16 (one rounding: within 2⁻⁸)."""
    torch.manual_seed(0)
    layer = _int4_layer(torch.randn(96, 256), group, torch.bfloat16)
    if not layer.native:
        pytest.skip("native kernels not built")
    assert layer.int8_activations == kernels.has_int8_path()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    weight = dequantize(layer.weight, layer.scales, layer.biases, 4)
    exact = F.linear(x.double(), weight.double())
    for bound in (rounding_bound(x, weight) if layer.int8_activations else 0, 0):
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
        assert bool(((got.double() - exact).abs() <= bound + exact.abs() * 2**-8 + 1e-6).all())
        exact_activations(layer)


@torch.no_grad()
def test_int4_fallback_and_exact_paths_agree(without_native_kernels):
    """Without the native kernels a CPU runs PyTorch's int4 kernel (scales and zeros rounded to bf16)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    layer = _int4_layer(weight, 64, torch.bfloat16)
    assert not layer.native and layer.packed is not None
    exact = _int4_layer(weight, 64, torch.float32)
    assert not exact.native and exact.packed is None
    x = torch.randn(2, 1, 256, dtype=torch.bfloat16)
    kernel, portable = layer(x), exact(x.float())
    assert _relative(kernel, portable) < 0.01
    # and the codes are a 4-bit picture of the weight: ~8% per-weight error on Gaussian data
    assert _relative(portable, F.linear(x.float(), weight)) < 0.15


def test_matmul_attention_matches_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 30, 16), torch.randn(2, 4, 30, 16)
    mask = torch.rand(2, 1, 1, 30) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(matmul_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_matmul_attention_in_bf16_matches_the_fused_kernel():
    """bf16 rings take the scores as keys · qᵀ (oneDNN's faster walk): the same attention, to bf16
    rounding, for one query and for several."""
    torch.manual_seed(1)
    for queries in (1, 3):
        q, k, v = torch.randn(2, 4, queries, 16), torch.randn(2, 4, 30, 16), torch.randn(2, 4, 30, 16)
        mask = torch.rand(2, 1, queries, 30) > 0.3
        mask[..., 0] = True
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask)
        got = matmul_attention(q, k, v, mask)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kind", ["chat", "transcribe"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_option_end_to_end_through_the_cli(tmp_path, kind, mode):
    folder = write_tiny_checkpoint(tmp_path / "tiny", kind, seed=3)
    generator = torch.Generator().manual_seed(0)
    wav = tmp_path / "in.wav"
    soundfile.write(wav, (0.1 * torch.randn(24000 * 2, generator=generator)).numpy(), 24000, subtype="FLOAT")
    if kind == "chat":
        args = ["chat", "--hf-repo", folder, "--input", wav, "--output", tmp_path / "out.wav"]
    else:
        args = ["transcribe", "--model", folder, wav, "-f", "json", "-o", tmp_path / "out"]
    result = subprocess.run([sys.executable, "-m", "moshi_tui", *map(str, args), "--quantize", mode],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"({mode})" in result.stderr  # the loader says what it did
    if kind == "chat":
        audio, rate = soundfile.read(tmp_path / "out.wav")
        assert rate == 24000 and len(audio) > 24000
    else:
        assert (tmp_path / "out" / "in.json").stat().st_size > 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "matmuls"])
@torch.no_grad()
def test_quantized_attention_over_the_filled_ring_matches_the_full_ring(lm_checkpoints, native):
    """Quantized models attend only over the ring slots written so far, with the native kernel
    where built, else two matmuls; through a slot reset and past the ring's wrap (context 100),
    that matches the fused kernel over the whole ring. (On a float model: the int8 activation
    codes would turn rounding noise into whole steps.)"""
    cfg = LMConfig.tiny_stt()
    if native and not kernels.attends(cfg.dim // cfg.num_heads):
        pytest.skip("no native kernels built")
    quantized = load_lm(lm_checkpoints["stt"], cfg, quantize="int8")
    assert all(m.fast_attention for m in quantized.modules() if isinstance(m, Attention))
    with contextlib.nullcontext() if native else kernels.disabled():
        lm = load_lm(lm_checkpoints["stt"], cfg, dtype=torch.float32)
        attentions = [m for m in lm.modules() if isinstance(m, Attention)]
        generator = torch.Generator().manual_seed(4)
        tokens = torch.randint(0, cfg.card, (2, cfg.num_streams, 130), generator=generator)
        tokens[:, 0] = torch.randint(0, cfg.text_card, (2, 130), generator=generator)
        runs = {}
        for fast in (True, False):
            for module in attentions:
                module.fast_attention = fast
            with lm.streaming(2):
                logits = []
                for t in range(130):
                    if t == 40:
                        lm.reset_streaming(torch.tensor([False, True]))
                    logits.append(lm.forward_text(tokens[:, :, t:t + 1])[1])
            runs[fast] = torch.cat(logits, dim=2)
        torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_matmul_attention_keeps_small_rings_in_fp32_and_large_ones_in_bf16(lm_checkpoints, monkeypatch):
    """Without the native kernels, the ring's dtype is a speed choice (engine/transformer.py): both
    give the same logits up to bf16 rounding, also once a bf16 ring is a third full (34 of 100
    slots) and attention runs over all of it, its unwritten slots masked. (On a bf16 model: int8
    activation codes would turn rounding noise into steps.)"""
    with kernels.disabled():
        cfg = LMConfig.tiny_stt()
        lm = load_lm(lm_checkpoints["stt"], cfg, dtype=torch.bfloat16)
        for module in lm.modules():
            if isinstance(module, Attention):
                module.fast_attention = True
        steps = 60
        tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=torch.Generator().manual_seed(5))
        tokens[:, 0] = tokens[:, 0] % cfg.text_card
        runs = {}
        for ring_max, dtype in ((transformer.FP32_RING_MAX_BYTES, torch.float32), (0, torch.bfloat16)):
            monkeypatch.setattr(transformer, "FP32_RING_MAX_BYTES", ring_max)
            with lm.streaming(1):
                rings = {m.state.cache.dtype for m in lm.modules() if isinstance(m, Attention)}
                assert rings == {dtype}
                runs[dtype] = torch.cat([lm.forward_text(tokens[:, :, t:t + 1])[1] for t in range(steps)], dim=2)
        assert _relative(runs[torch.bfloat16], runs[torch.float32]) < 0.01


# The depformer's logits against bf16, measured on the tiny model: int8 2.3%, int4 19% (its
# per-step linears and heads are quantized like the temporal ones); the bounds are about twice that.
DEPFORMER_TOLERANCE = {"int8": 0.05, "int4": 0.4}


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_depformer_logits_within_tolerance_of_bf16(lm_checkpoints, mode):
    """Teacher-forced: every model sees the same temporal outputs and the same previous codebook."""
    cfg = LMConfig.tiny_moshi()
    generator = torch.Generator().manual_seed(6)
    frames = 10
    hidden = torch.randn(frames, 1, 1, cfg.dim, generator=generator).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.card, (frames, cfg.dep_q), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (frames,), generator=generator)
    logits = {}
    for name in ("bf16", mode):
        lm = load_lm(lm_checkpoints["moshi"], cfg, quantize=None if name == "bf16" else mode)
        if name != "bf16":
            kinds = {type(m) for m in [*lm.depformer_in, *lm.linears, *lm.depformer.modules()]}
            assert torch.nn.Linear not in kinds and (AffineLinear if mode == "int4" else Int8Linear) in kinds
        out = []
        with lm.streaming(1):
            for t in range(frames):
                lm.depformer.reset_streaming()
                out += [lm.forward_depformer(k, tokens[t, k].view(1, 1), hidden[t]) for k in range(cfg.dep_q)]
        logits[name] = torch.cat(out)
    error = _relative(logits[mode], logits["bf16"])
    print(f"depformer {mode}: relative logit error {error:.4f}")
    assert 0 < error < DEPFORMER_TOLERANCE[mode]
