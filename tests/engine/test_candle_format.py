"""Kyutai's candle checkpoints (Rust layout, bf16 safetensors and Q8_0 GGUF) against the reference.

The files are written as Kyutai's export does (``candle_support``: the Rust layout, a GGUF by the
``gguf`` package with its own Q8_0 quantizer). The oracle is moshi 0.2.13 on the same weights in
the official layout: the bf16 weights as they are, the q8 file's weights dequantized to fp32 by
the ``gguf`` package.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import soundfile
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import load_file, save_file

from engine import formats, kernels
from engine.errors import CheckpointError
from engine.formats.candle import CANDLE_BF16, CANDLE_Q8
from engine.formats.shapes import lm_config_from_shapes
from engine.hub import LEGACY_MIMI_WEIGHTS, LEGACY_TOKENIZER
from engine.mimi.model import MimiConfig
from engine.mimi.tiny import random_mimi_state
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.loading import load_lm
from engine.moshi.tiny import random_lm_state, write_tiny_lm_checkpoint
from engine.quant import BlockInt8Embedding, BlockInt8Linear, exact_activations

from candle_support import TINY_CANDLE, dequantized_official, rust_layout, write_candle_files, write_q8_gguf
from int8_support import rounding_bound
from transcribe_support import said_text

ref_loaders = pytest.importorskip("moshi.models.loaders")
ref_lm = pytest.importorskip("moshi.models.lm")
ref_inference = pytest.importorskip("moshi.run_inference")

# The bf16 Q8_0 kernels against fp32 on the dequantized weights, relative error of the teacher-forced
# text logits: measured 0.012 on this model with either kernel (the activations' rounding to bf16
# compounds through the layers; PyTorch's int4 kernel also rounds the scales, which adds little),
# bounded at about twice that.
FAST_KERNEL_BOUND = 0.025


@pytest.fixture(scope="module")
def candle(tmp_path_factory):
    return write_candle_files(tmp_path_factory.mktemp("candle"))


def _reference(path, dtype):
    return ref_loaders.get_moshi_lm(str(path), TINY_CANDLE.to_dict(), device="cpu", dtype=dtype)


def _codes(steps, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_CANDLE.card, (steps, 1, TINY_CANDLE.n_q - TINY_CANDLE.dep_q, 1), generator=generator)


def _same_tokens(ref_model, model, steps=30):
    ref_gen = ref_lm.LMGen(ref_model, use_sampling=False)
    gen = LMGen(model, Sampling.greedy())
    codes, texts = _codes(steps), set()
    with ref_gen.streaming(1), gen.streaming(1):
        for t in range(steps):
            expected, got = ref_gen.step(codes[t]), gen.step(codes[t])
            if t == 0:
                assert expected is None and got is None
                continue
            assert torch.equal(expected, got), f"step {t}: {expected.flatten().tolist()} != {got.flatten().tolist()}"
            texts.add(int(got[0, 0, 0]))
    assert len(texts) > 3, "degenerate random model: the comparison would prove little"


def _text_logits(lm, steps=12):
    """Teacher-forced text logits [steps, text_card] (ours and the reference's have the same API)."""
    generator = torch.Generator().manual_seed(0)
    cfg = TINY_CANDLE
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=generator)
    with torch.no_grad(), lm.streaming(1):
        return torch.cat([lm.forward_text(tokens[:, :, t:t + 1])[1][0, 0] for t in range(steps)]).float()


def test_files_are_told_apart_by_content(candle, tmp_path):
    assert formats.detect(candle["q8"]).name == "candle-q8"
    assert formats.detect(candle["bf16"]).name == "candle-bf16"
    assert formats.detect(candle["official"]) is None
    renamed = tmp_path / "model.safetensors"  # the name of a candle file, the content of an official one
    renamed.write_bytes(candle["official"].read_bytes())
    assert formats.detect(renamed) is None
    disguised = tmp_path / "model.bin"
    disguised.write_bytes(candle["q8"].read_bytes())
    assert formats.detect(disguised).name == "candle-q8"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_candle_bf16_gives_the_reference_tokens(candle, dtype):
    _same_tokens(_reference(candle["official"], dtype), load_lm(candle["bf16"], TINY_CANDLE, dtype=dtype))


def test_candle_q8_in_float32_gives_the_reference_tokens_on_its_dequantized_weights(candle):
    model = load_lm(candle["q8"], TINY_CANDLE, dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, BlockInt8Linear)]
    assert len(blocks) > 30 and all(b.packed is None and not b.native for b in blocks)  # the exact path
    assert isinstance(model.text_emb, BlockInt8Embedding) and isinstance(model.depformer_emb[6], BlockInt8Embedding)
    _same_tokens(_reference(candle["dequantized"], torch.float32), model)


def _fast_kernel_error(candle, kernel):
    model = load_lm(candle["q8"], TINY_CANDLE)  # bf16: a kernel
    blocks = [m for m in model.modules() if isinstance(m, BlockInt8Linear)]
    if kernel == "native":  # any number of outputs
        assert len(blocks) > 30 and all(b.native and b.packed is None for b in blocks)
    else:
        # PyTorch's int4 kernel takes a multiple of 16 outputs (every linear of Moshi 7B); the tiny
        # text head (200) takes the exact path.
        packed = [b for b in blocks if b.out_features % 16 == 0]
        assert len(packed) > 30 and all(b.packed is not None and b.weight is None for b in packed)
    expected = _text_logits(_reference(candle["dequantized"], torch.float32))
    error = float((_text_logits(model) - expected).norm() / expected.norm())
    print(f"candle q8 {kernel} kernel: relative text-logit error {error:.4f}")
    assert 0 < error < FAST_KERNEL_BOUND


def test_candle_q8_native_kernel_within_its_bound(candle):
    if BlockInt8Linear.kernel(256, 256, torch.device("cpu"), torch.bfloat16) != "native":
        pytest.skip("native kernels not built")
    _fast_kernel_error(candle, "native")


def test_candle_q8_without_native_kernels_within_its_bound(candle, without_native_kernels):
    _fast_kernel_error(candle, "int4")


def test_block_int8_linear_both_paths_against_the_gguf_dequantization():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator) / 16
    raw = quants.quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    dequantized = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    blocks = raw.reshape(96, 8, 34)
    # Positive inputs: an error in a block's scale or offset adds up over the inputs instead of cancelling.
    x = torch.rand(3, 256, generator=generator)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16, "int4"):
        linear = BlockInt8Linear(256, 96, torch.bfloat16 if dtype == "int4" else dtype)
        linear.scales.data = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0])
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(96, 256))
        if dtype == torch.float32:
            assert torch.equal(linear.dequantized(), dequantized)
        if dtype == "int4":  # PyTorch's int4 kernel: the path of an install without ours
            linear.weight.data = linear.weight.data.view(96, 8, 32)  # as read from the file's pages
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(kernels, "fits", lambda *args: False)
                linear.prepare()
            assert linear.packed is not None
        else:
            linear.prepare()
            assert linear.native == (dtype == torch.bfloat16 and kernels.chosen_variant() is not None)
        if dtype == torch.bfloat16:
            assert linear.int8_activations == (linear.native and kernels.has_int8_path())
            outputs["int8"] = linear(x.bfloat16()).float()  # by default: x in Q8_0 blocks where built
            exact_activations(linear)
        outputs[dtype] = linear(x.bfloat16() if dtype == "int4" else x.to(dtype)).float()
    assert torch.equal(outputs[torch.float32], torch.nn.functional.linear(x, dequantized))
    expected = x.bfloat16().float() @ dequantized.T
    magnitude = x.bfloat16().float().abs() @ dequantized.abs().T
    # Native: the fp32 product of the exact weights up to the order of the sums (1e-6 of the
    # magnitude), then the output rounded to bf16 (2^-8 of it); by default, where the int8 path is
    # built, x's rounding to Q8_0 blocks too (as candle multiplies).
    error = (outputs[torch.bfloat16] - expected).abs()
    assert (error <= 1e-6 * magnitude + 2 ** -8 * expected.abs()).all()
    error = (outputs["int8"] - expected).abs()
    assert (error <= rounding_bound(x.bfloat16(), dequantized) + 1e-6 * magnitude + 2 ** -8 * expected.abs()).all()
    # PyTorch's int4 kernel: the scales rounded to bf16 too (2^-9 of each product).
    error = (outputs["int4"] - expected).abs()
    assert (error <= 2 ** -9 * magnitude + 2 ** -9 * expected.abs() + 1e-6).all()
    assert error.max() > 0


@pytest.mark.parametrize("fmt", [CANDLE_Q8, CANDLE_BF16], ids=lambda fmt: fmt.name)
def test_sizes_come_from_the_shapes_without_a_config(candle, fmt):
    model = fmt.load_lm(candle["q8" if fmt is CANDLE_Q8 else "bf16"], None, torch.device("cpu"), torch.float32, None)
    cfg = model.cfg
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_hidden) == (256, 2, 2, 672)
    assert (cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_num_layers, cfg.depformer_ffn_hidden) == (
        64, 1, 2, 176)
    assert (cfg.text_card, cfg.card, cfg.n_q, cfg.dep_q, cfg.delays) == (
        TINY_CANDLE.text_card, TINY_CANDLE.card, 16, 8, TINY_CANDLE.delays)


def test_a_width_that_fits_no_head_size_is_one_line():
    shapes = {"text_emb.weight": (33, 96), "text_linear.weight": (32, 96), "out_norm.alpha": (1, 1, 96),
              "emb.0.weight": (65, 96), "transformer.layers.0.norm1.alpha": (1, 1, 96),
              "transformer.layers.0.gating.linear_in.weight": (512, 96)}
    with pytest.raises(CheckpointError, match="96 wide, not a multiple of Moshi's head size 128") as err:
        lm_config_from_shapes(shapes)
    assert "\n" not in str(err.value)


def test_gguf_of_an_unsupported_tensor_type_is_one_line(candle, tmp_path):
    path = tmp_path / "q4.gguf"
    writer = GGUFWriter(str(path), arch="moshi")
    writer.add_tensor("text_emb.weight", quants.quantize(np.ones((8, 64), np.float32), GGMLQuantizationType.Q4_0),
                      raw_dtype=GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"text_emb\.weight is of GGUF type Q4_0; moshi reads F32, F16 and Q8_0"):
        load_lm(path, TINY_CANDLE)


def test_a_gguf_that_is_not_moshi_is_one_line(tmp_path):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.ones((8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="no text_emb.weight: not a Moshi language model"):
        CANDLE_Q8.load_lm(path, None, torch.device("cpu"), torch.float32, None)


def test_unknown_layouts_and_a_codec_are_one_line(tmp_path):
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match="none of a Moshi language model's tensors"):
        load_lm(unknown, TINY_CANDLE)
    codec = tmp_path / "mimi.safetensors"
    save_file({"quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum": torch.zeros(2, 2)}, codec)
    with pytest.raises(CheckpointError, match="is a Mimi codec in the transformers layout, not a language model"):
        load_lm(codec, TINY_CANDLE)


def test_slices_whose_norm_copies_differ_are_refused(tmp_path):
    state = rust_layout(random_lm_state(TINY_CANDLE, seed=2), TINY_CANDLE)
    state["depformer.3.transformer.layers.1.norm2.alpha"] = state["depformer.3.transformer.layers.1.norm2.alpha"] * 2
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"depformer\.3\.transformer\.layers\.1\.norm2\.alpha differs"):
        load_lm(path, TINY_CANDLE)


@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory):
    """A candle q8 folder as Kyutai's repo has it (no config.json; the LM, the full-size Mimi and the
    tokenizer under their published names), and a reference folder of the same models: config.json
    and the q8 file's weights dequantized to fp32 in the official layout."""
    root = tmp_path_factory.mktemp("candle-chat")
    reference = write_tiny_lm_checkpoint(root / "reference", TINY_CANDLE, seed=3, model_type="moshi")
    state = load_file(reference / "model.safetensors")
    cfg = replace(TINY_CANDLE, text_card=state["text_linear.weight"].shape[0])
    candle = root / "candle"
    candle.mkdir()
    write_q8_gguf(candle / "model.q8.gguf", rust_layout(state, cfg))
    save_file(dequantized_official(state), reference / "model.safetensors")
    mimi = random_mimi_state(MimiConfig.official(), seed=3)  # no config.json: the released codec's size
    save_file(mimi, candle / LEGACY_MIMI_WEIGHTS)
    save_file(mimi, reference / "mimi.safetensors")
    shutil.copy(reference / "tokenizer.model", candle / LEGACY_TOKENIZER)
    config = json.loads((reference / "config.json").read_text())
    del config["mimi_config_name"]
    (reference / "config.json").write_text(json.dumps(config))
    return candle, reference


def test_moshi_chat_on_a_candle_folder_gives_the_reference_words(chat_folders, tmp_path):
    """Through the user's loader: the folder resolves to its GGUF, the LM sizes come from the
    weights, and in fp32 the words are those of Kyutai's inference loop on the dequantized weights."""
    candle, reference = chat_folders
    generator = torch.Generator().manual_seed(0)
    pcm = (0.3 * torch.randn(20 * 1920, generator=generator)).numpy()  # 20 frames of 80 ms
    soundfile.write(tmp_path / "in.wav", pcm, 24000, subtype="FLOAT")
    result = subprocess.run(
        [sys.executable, "-m", "moshi_tui", "chat", "--hf-repo", str(candle), "--input", str(tmp_path / "in.wav"),
         "--output", str(tmp_path / "out.wav"), "--dtype", "float32", "--temp", "0", "--temp-text", "0"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr
    assert "model.q8.gguf" not in result.stderr  # no complaint about the file
    out, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and len(out) == len(pcm)

    info = ref_loaders.CheckpointInfo.from_hf_repo(
        str(reference), moshi_weights=reference / "model.safetensors", mimi_weights=reference / "mimi.safetensors",
        tokenizer=reference / "tokenizer.model", config_path=reference / "config.json")
    tokens = []
    state = ref_inference.InferenceState(
        info, info.get_mimi(device="cpu"), info.get_text_tokenizer(), info.get_moshi(device="cpu", dtype=torch.float32),
        batch_size=1, cfg_coef=1.0, device="cpu", on_text_hook=lambda t: tokens.append(int(t[0])),
        **{**info.lm_gen_config, "temp": 0.0, "temp_text": 0.0})
    with torch.no_grad():
        state.run(torch.from_numpy(pcm)[None, None])
    expected = said_text(reference / "tokenizer.model", tokens[:-1])  # the last one sampled is never said
    assert len(expected) > 10
    assert result.stdout.strip("\n") == expected


def test_a_version_2_gguf_as_candle_writes_loads_the_same(candle, tmp_path):
    """candle's writer (Kyutai's files) says GGUF version 2, gguf-py's 3; the layout is the same."""
    data = bytearray(candle["q8"].read_bytes())
    assert data[:4] == b"GGUF" and int.from_bytes(data[4:8], "little") == 3
    data[4:8] = (2).to_bytes(4, "little")
    (tmp_path / "v2.gguf").write_bytes(data)
    v2, v3 = (load_lm(path, TINY_CANDLE, dtype=torch.float32) for path in (tmp_path / "v2.gguf", candle["q8"]))
    assert torch.equal(_text_logits(v2), _text_logits(v3))
