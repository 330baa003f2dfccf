"""MoshiVis: the official checkpoint layout, the shared cross-attention, and the promise that with
the gate closed it is exactly the plain Moshi LM with the same weights and depth-transformer norms.
(test_moshivis_kyuteye.py compares it with Kyutai's own code.)
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import CheckpointError
from engine.hub import CheckpointInfo
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.model import LMConfig, LMModel
from engine.moshivis.loading import load_moshivis, to_official_layout
from engine.moshivis.model import MoshiVis, MoshiVisConfig
from engine.moshivis.runner import SeeRunner
from engine.moshivis.vision import ImageError, SiglipTower, VisionConfig, open_image
from engine.options import SeeOptions
from engine.quant import AffineLinear, Int8Linear
from engine.wire import gate_colour

@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    stripes = np.zeros((120, 160, 3), np.uint8)
    stripes[::8] = (250, 200, 10)
    paths = {"noise.png": folder / "noise.png", "stripes.jpg": folder / "stripes.jpg"}
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(paths["noise.png"])
    Image.fromarray(stripes).save(paths["stripes.jpg"])
    return paths


def _config(folder):
    return MoshiVisConfig.from_checkpoint(CheckpointInfo.resolve(folder))


def _user_codes(steps, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (steps, 1, 8, 1), generator=generator)


# -- layout and loading --------------------------------------------------------------------------


def _official_shapes(lm: LMConfig, vision: VisionConfig) -> dict[str, tuple]:
    """Key -> shape of moshika-vis-pytorch-bf16 (moshivis.md §5), for any size."""
    d, dd, h, q = lm.dim, lm.depformer_dim, vision.hidden, lm.dep_q
    shapes = {"llm.text_emb.weight": (lm.text_card + 1, d), "llm.text_linear.weight": (lm.text_card, d),
              "llm.out_norm.alpha": (1, 1, d),
              "llm.transformer.layers.0.cross_attention.mha.in_proj_weight": (3 * d, d),
              "llm.transformer.layers.0.cross_attention.mha.out_proj.weight": (d, d),
              "depformer_text_emb.weight": (lm.text_card + 1, dd),
              "image_prefix.enc.model.embeddings.patch_embedding.weight": (h, 3, vision.patch, vision.patch),
              "image_prefix.enc.model.embeddings.patch_embedding.bias": (h,),
              "image_prefix.enc.model.embeddings.position_embedding.weight": (vision.num_patches, h),
              "image_prefix.enc.model.post_layernorm.weight": (h,), "image_prefix.enc.model.post_layernorm.bias": (h,),
              "image_prefix.proj_xa.weight": (d, h), "image_prefix.proj_xa.bias": (d,),
              "image_prefix.norm_xa.alpha": (1, 1, d)}
    for i in range(lm.num_layers):
        layer = f"llm.transformer.layers.{i}."
        shapes.update({layer + "self_attn.in_proj_weight": (3 * d, d), layer + "self_attn.out_proj.weight": (d, d),
                       layer + "norm1.alpha": (1, 1, d), layer + "norm2.alpha": (1, 1, d),
                       layer + "norm_cross.alpha": (1, 1, d),
                       layer + "gating.linear_in.weight": (2 * lm.ffn_hidden, d),
                       layer + "gating.linear_out.weight": (d, lm.ffn_hidden),
                       layer + "cross_attention.gate.alpha.0.weight": (d // 8, d),
                       layer + "cross_attention.gate.alpha.2.weight": (d, d // 8)})
    for k in range(lm.n_q):
        shapes[f"audio_emb.{k}.weight"] = (lm.card + 1, d)
    for k in range(q):
        shapes[f"audio_linears.{k}.weight"] = (lm.card, dd)
        shapes[f"depformer_in.{k}.weight"] = (dd, d)
    for k in range(q - 1):
        shapes[f"depformer_emb.{k}.weight"] = (lm.card + 1, dd)
    for j in range(lm.depformer_num_layers):
        layer = f"depformer.layers.{j}."
        shapes.update({layer + "self_attn.in_proj_weight": (q * 3 * dd, dd),
                       layer + "self_attn.out_proj.weight": (q * dd, dd),
                       layer + "norm1.alpha": (1, 1, dd), layer + "norm2.alpha": (1, 1, dd)})
        for k in range(q):
            shapes[layer + f"gating.{k}.linear_in.weight"] = (2 * lm.depformer_ffn_hidden, dd)
            shapes[layer + f"gating.{k}.linear_out.weight"] = (dd, lm.depformer_ffn_hidden)
    for i in range(vision.num_layers):
        layer = f"image_prefix.enc.model.encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            shapes[layer + f"self_attn.{proj}_proj.weight"] = (h, h)
            shapes[layer + f"self_attn.{proj}_proj.bias"] = (h,)
        shapes.update({layer + "mlp.fc1.weight": (vision.mlp_hidden, h), layer + "mlp.fc1.bias": (vision.mlp_hidden,),
                       layer + "mlp.fc2.weight": (h, vision.mlp_hidden), layer + "mlp.fc2.bias": (h,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[layer + f"{norm}.weight"] = (h,)
            shapes[layer + f"{norm}.bias"] = (h,)
    return shapes


def test_tiny_checkpoint_has_the_official_layout(vis_folders):
    cfg = _config(vis_folders["vis"])
    with safe_open(str(vis_folders["vis"] / "model.safetensors"), "pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}
    assert stored == _official_shapes(cfg.lm, cfg.vision)
    # The tower in fp32, everything else in bf16: loading must cope with mixed dtypes.
    assert {dtypes[k] for k in dtypes if k.startswith("image_prefix.enc.")} == {torch.float32}
    assert {dtypes[k] for k in dtypes if not k.startswith("image_prefix.enc.")} == {torch.bfloat16}


def test_a_repo_without_config_json_is_moshika_vis(vis_folders):
    """The official repo has no config.json: the architecture is Moshi 7B's plus SigLIP-448."""
    info = CheckpointInfo.resolve(vis_folders["vis"])
    info.raw_config = None
    cfg = MoshiVisConfig.from_checkpoint(info)
    assert (cfg.lm.dim, cfg.lm.num_layers, cfg.lm.num_heads, cfg.lm.ffn_hidden, cfg.lm.text_card) == (
        4096, 32, 32, 11264, 32000)
    assert (cfg.vision.image_size, cfg.vision.num_layers, cfg.xa_start) == (448, 27, 16)


def test_full_size_layout_and_adapter_size():
    """At full size (on the meta device): the spec's key names and shapes, and its ~206 M adapter weights."""
    cfg = MoshiVisConfig.moshika_vis()
    with torch.device("meta"):
        model, plain, tower = MoshiVis(cfg), LMModel(LMConfig.moshi_7b()), SiglipTower(cfg.vision)
    ours = {k: tuple(v.shape) for k, v in to_official_layout(model.state_dict()).items()}
    expected = _official_shapes(cfg.lm, cfg.vision)
    # Our self-attention modules keep one projection per step, which the file fuses (weights.py splits it).
    def fused(key):
        return key.startswith(("llm.", "depformer.")) and ".self_attn." in key

    assert {k for k in ours if not fused(k)} == {k for k in expected if not fused(k)}
    assert all(ours[k] == expected[k] for k in ours if not fused(k))
    count = sum(p.numel() for p in model.parameters())
    adapters = count - sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in tower.parameters())
    assert adapters == 4 * 4096**2 + 32 * 2 * 4096 * 512 + 1152 * 4096 + 4096 + 33 * 4096  # 206,184,448


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_with_the_shared_cross_attention_tied(vis_folders, dtype):
    path = vis_folders["vis"] / "model.safetensors"
    stored = load_file(path)
    model = load_moshivis(path, _config(vis_folders["vis"]), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    pairs = {"audio_emb.3.weight": model.lm.emb[3].weight, "audio_linears.5.weight": model.lm.linears[5].weight,
             "llm.text_emb.weight": model.lm.text_emb.weight,
             "llm.transformer.layers.1.cross_attention.gate.alpha.2.weight":
                 model.lm.transformer.layers[1].cross_attention.gate.alpha[2].weight,
             "image_prefix.enc.model.encoder.layers.1.mlp.fc2.weight":
                 model.image_prefix.tower.encoder.layers[1].mlp.fc2.weight,
             "image_prefix.norm_xa.alpha": model.image_prefix.norm_xa.alpha,
             "llm.transformer.layers.0.cross_attention.mha.in_proj_weight":
                 model.lm.transformer.shared_cross_attention.in_proj_weight}
    for key, param in pairs.items():
        assert torch.equal(param, stored[key].to(dtype)), key
    shared = [name for name, p in model.named_parameters() if p.shape == stored[
        "llm.transformer.layers.0.cross_attention.mha.in_proj_weight"].shape and "cross" in name]
    assert shared == ["lm.transformer.shared_cross_attention.in_proj_weight"], "one cross-attention for all layers"


def _broken(vis_folders, tmp_path, change):
    state = load_file(vis_folders["vis"] / "model.safetensors")
    change(state)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path


XA = "llm.transformer.layers.{}.cross_attention.mha.{}"


def test_missing_shared_cross_attention_is_named(vis_folders, tmp_path):
    path = _broken(vis_folders, tmp_path, lambda s: s.pop(XA.format(0, "in_proj_weight")))
    with pytest.raises(CheckpointError, match="lacks the shared cross-attention weight "
                       r"llm\.transformer\.layers\.0\.cross_attention\.mha\.in_proj_weight"):
        load_moshivis(path, _config(vis_folders["vis"]))


def test_cross_attention_without_mha_is_named(vis_folders, tmp_path):
    """The candle layout stores the shared weights without `.mha`."""
    def to_candle_names(state):
        for name in ("in_proj_weight", "out_proj.weight"):
            state[f"llm.transformer.layers.0.cross_attention.{name}"] = state.pop(XA.format(0, name))

    with pytest.raises(CheckpointError) as err:
        load_moshivis(_broken(vis_folders, tmp_path, to_candle_names), _config(vis_folders["vis"]))
    assert "mha.in_proj_weight" in str(err.value)
    assert "found instead: llm.transformer.layers.0.cross_attention.in_proj_weight" in str(err.value)


def test_repeated_shared_weights_must_be_identical(vis_folders, tmp_path):
    cfg = _config(vis_folders["vis"])

    def repeat(state, change):
        state[XA.format(1, "out_proj.weight")] = state[XA.format(0, "out_proj.weight")] * change

    model = load_moshivis(_broken(vis_folders, tmp_path, lambda s: repeat(s, 1)), cfg)
    assert model.lm.transformer.shared_cross_attention.out_proj.weight.shape == (cfg.lm.dim, cfg.lm.dim)
    with pytest.raises(CheckpointError, match=r"layers\.1\.cross_attention\.mha\.out_proj\.weight differs"):
        load_moshivis(_broken(vis_folders, tmp_path, lambda s: repeat(s, 2)), cfg)


def test_missing_gate_and_plain_checkpoint_are_named(vis_folders, tmp_path):
    path = _broken(vis_folders, tmp_path, lambda s: s.pop("llm.transformer.layers.1.cross_attention.gate.alpha.2.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): .*layers\.1\.cross_attention\.gate\.alpha\.2"):
        load_moshivis(path, _config(vis_folders["vis"]))
    with pytest.raises(CheckpointError, match="not a MoshiVis checkpoint"):
        load_moshivis(vis_folders["chat"] / "model.safetensors", _config(vis_folders["vis"]))
    with pytest.raises(CheckpointError, match="not a MoshiVis model"):
        _config(vis_folders["chat"])


# -- gate closed, gate open ------------------------------------------------------------------------


def _vis_gen(vis_folders, dtype, xa_start, picture=None):
    model = load_moshivis(vis_folders["vis"] / "model.safetensors", _config(vis_folders["vis"]), dtype=dtype)
    gen = LMGen(model.lm, Sampling.greedy(), xa_start=xa_start)
    source = None if picture is None else model.embed_image(open_image(picture))
    return gen, source


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("closed_by", ["no image", "before xa_start"])
def test_gate_closed_gives_the_plain_lm_tokens(vis_folders, pictures, dtype, closed_by):
    picture = None if closed_by == "no image" else pictures["noise.png"]
    vis, source = _vis_gen(vis_folders, dtype, xa_start=1000, picture=picture)
    assert vis.lm.cfg.depformer_norm == "rms_norm_f32_variance"
    # The plain LM of the same weights, without the cross-attention's.
    lm = LMModel(replace(vis.lm.cfg, cross_attention=False)).to(dtype)
    lm.load_state_dict({k: v for k, v in vis.lm.state_dict().items() if "cross" not in k})
    plain = LMGen(lm, Sampling.greedy())
    codes = _user_codes(30)
    frames = set()
    with plain.streaming(1), vis.streaming(1):
        if source is not None:
            vis.set_cross_source(source)
        for t in range(30):
            expected, got = plain.step(codes[t]), vis.step(codes[t])
            if t == 0:
                assert expected is None and got is None
                continue
            assert torch.equal(expected, got), f"step {t}"
            frames.add(tuple(got[0, :, 0].tolist()))
    assert len(frames) > 20, "degenerate random model: the comparison would prove little"


def _logits(gen, out):
    return gen.lm.text_linear(out.hidden).float()


def test_gate_open_changes_the_logits_from_xa_start_on(vis_folders, pictures):
    xa_start = 5
    runs = {}
    for name in (None, "noise.png", "stripes.jpg"):
        gen, source = _vis_gen(vis_folders, torch.float32, xa_start, None if name is None else pictures[name])
        codes = _user_codes(12)
        with gen.streaming(1):
            if source is not None:
                gen.set_cross_source(source)
            runs[name] = [_logits(gen, gen.step_full(codes[t])) for t in range(12)]
    for t in range(xa_start):
        assert torch.equal(runs["noise.png"][t], runs[None][t]), f"step {t}: the image is not looked at yet"
    # At xa_start the inputs are still the same; only the image can make a difference.
    for t in (xa_start, xa_start + 1):
        assert (runs["noise.png"][t] - runs[None][t]).abs().max() > 1e-3, f"step {t}"
        assert (runs["noise.png"][t] - runs["stripes.jpg"][t]).abs().max() > 1e-4, f"step {t}: two pictures"


def test_gate_strength_is_the_mean_of_the_last_layers_gates(vis_folders, pictures):
    gen, source = _vis_gen(vis_folders, torch.float32, xa_start=3, picture=pictures["stripes.jpg"])
    seen = []
    hooks = [layer.cross_attention.gate.register_forward_hook(lambda m, i, out: seen.append(out.mean()))
             for layer in gen.lm.transformer.layers]
    codes = _user_codes(8)
    with gen.streaming(1):
        gen.set_cross_source(source)
        keys = gen.lm.transformer.state.keys
        for t in range(8):
            seen.clear()
            out = gen.step_full(codes[t])
            assert out.gate.shape == (1,) and out.gate.device == out.hidden.device
            if t < 3:
                assert float(out.gate[0]) == 0.0
            else:
                layers = gen.lm.cfg.num_layers
                expected = torch.stack(seen[-min(10, layers):]).mean()
                assert 0.0 < float(out.gate[0]) < 1.0
                torch.testing.assert_close(out.gate[0], expected, rtol=0, atol=1e-6)
            # The image's keys/values were projected once, not per step.
            assert gen.lm.transformer.state.keys is keys
    for hook in hooks:
        hook.remove()
    assert gate_colour(0.0) == 0 and gate_colour(0.013) == 5 and gate_colour(0.5) == 10


def test_reset_keeps_the_image_and_a_slot_reset_restarts_its_xa_start(vis_folders, pictures):
    gen, source = _vis_gen(vis_folders, torch.float32, xa_start=2, picture=pictures["noise.png"])
    codes = _user_codes(6)
    with gen.streaming(2):
        gen.set_cross_source(source)
        for t in range(4):
            gen.step_full(codes[t].expand(2, -1, -1))
        gen.reset_streaming(torch.tensor([False, True]))
        out = gen.step_full(codes[4].expand(2, -1, -1))
        assert float(out.gate[0]) > 0 and float(out.gate[1]) == 0.0, "slot 1 starts over, slot 0 goes on"
        gen.reset_streaming()
        for t in range(3):
            out = gen.step_full(codes[t].expand(2, -1, -1))
        assert (out.gate > 0).all(), "the image survives a full reset"


# -- quantized -----------------------------------------------------------------------------------

# Relative error of the text logits against bf16 on the same inputs, about twice what was measured
# on this tiny random model (int8 0.029, int4 0.23: the plain LM's figures, tests/engine/test_quant.py).
LOGIT_TOLERANCE = {"int8": 0.06, "int4": 0.4}
# Largest gate error as a share of the bf16 gate's own range over the steps; measured 0.058 and 0.098.
GATE_TOLERANCE = {"int8": 0.12, "int4": 0.2}


def _teacher_forced(model, picture, steps=20):
    """Text logits [steps, text_card] and gates [steps] with the picture attended from the first step;
    the inputs are fixed, not sampled, so that every model sees the same ones."""
    cfg = model.lm.cfg
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=generator)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=generator)
    logits, gates = [], []
    with torch.no_grad(), model.lm.streaming(1):
        model.lm.transformer.set_cross_source(model.embed_image(open_image(picture)))
        for t in range(steps):
            logits.append(model.lm.forward_text(tokens[:, :, t:t + 1])[1][0, 0].float())
            gates.append(float(model.lm.transformer.gate_strength[0]))
    return torch.cat(logits), torch.tensor(gates)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_moshivis_within_tolerance_of_bf16(vis_folders, pictures, mode):
    path, cfg = vis_folders["vis"] / "model.safetensors", _config(vis_folders["vis"])
    plain, quantized = load_moshivis(path, cfg), load_moshivis(path, cfg, quantize=mode)
    quantized_types = (Int8Linear, AffineLinear) if mode == "int4" else (Int8Linear,)
    linears = {name: type(m) for name, m in quantized.named_modules()
               if isinstance(m, (nn.Linear, Int8Linear, AffineLinear))}
    floats = sorted(name for name, kind in linears.items() if kind is nn.Linear)
    # What load_lm quantizes is quantized; the vision tower and the cross-attention are not.
    assert all(name.startswith("image_prefix.") or ".cross_attention." in name or "shared_cross_attention" in name
               for name in floats), floats
    assert any(".cross_attention.gate." in name for name in floats) and any("tower" in name for name in floats)
    assert sum(kind in quantized_types for kind in linears.values()) >= 4 * cfg.lm.num_layers + 1
    if mode == "int4":
        assert AffineLinear in linears.values()
    assert quantized.lm.emb[0].weight.dtype == torch.bfloat16
    expected_logits, expected_gates = _teacher_forced(plain, pictures["noise.png"])
    logits, gates = _teacher_forced(quantized, pictures["noise.png"])
    error = float((logits - expected_logits).norm() / expected_logits.norm())
    gate_range = float(expected_gates.max() - expected_gates.min())
    gate_error = float((gates - expected_gates).abs().max()) / gate_range
    print(f"MoshiVis {mode}: relative logit error {error:.4f}, gate error {gate_error:.3f} of its range")
    assert 0 < error < LOGIT_TOLERANCE[mode]
    assert gate_range > 1e-4, "a flat gate would make the comparison prove little"
    assert gate_error < GATE_TOLERANCE[mode]


def test_unknown_quantization_is_named(vis_folders):
    with pytest.raises(CheckpointError, match="unknown quantization 'int3'"):
        load_moshivis(vis_folders["vis"] / "model.safetensors", _config(vis_folders["vis"]), quantize="int3")


# -- the runner ------------------------------------------------------------------------------------


def test_see_runner(vis_folders, pictures):
    options = SeeOptions(hf_repo=str(vis_folders["vis"]), image=str(pictures["stripes.jpg"]), temp=0, temp_text=0)
    runner = SeeRunner.load(options)
    assert runner.describe()["image"] == "stripes.jpg"
    rng = np.random.default_rng(1)
    frames = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(22)]

    def run():
        return [runner.step(frame) for frame in frames]

    first = run()
    assert first[0].pcm is None and all(out.pcm.shape == (1920,) for out in first[1:])
    # xa_start is 16 LM steps, and frame 16 is LM step 16.
    assert [out.gate > 0 for out in first] == [False] * 16 + [True] * 6
    runner.reset()
    again = run()
    assert [o.token for o in again] == [o.token for o in first] and [o.gate for o in again] == [o.gate for o in first]
    runner.set_image(open_image(pictures["noise.png"]), "noise.png")
    other = run()
    assert other[-1].gate != first[-1].gate


def test_see_runner_steps_as_kyuteyes_server(vis_folders, pictures):
    """Kyutai's MoshiVis server encodes every frame once, Mimi going on, and steps the LM once on
    its codes: no double feed of frame 0, no restart of Mimi after it."""
    options = SeeOptions(hf_repo=str(vis_folders["vis"]), image=str(pictures["stripes.jpg"]), xa_start=3, temp=0,
                         temp_text=0)
    runner = SeeRunner.load(options)
    rng = np.random.default_rng(2)
    frames = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(12)]
    outs = [runner.step(frame) for frame in frames]
    runner.reset()
    mimi = runner.models.mimi
    with torch.no_grad():
        for frame, out in zip(frames, outs):
            tokens = runner.gen.step(mimi.encode(torch.from_numpy(frame).view(1, 1, -1)))
            if tokens is None:
                assert out.pcm is None and out.token is None
                continue
            assert out.token == int(tokens[0, 0, 0])
            np.testing.assert_array_equal(out.pcm, mimi.decode(tokens[:, 1:])[0, 0].float().numpy())
    assert sum(out.pcm is None for out in outs) == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_see_runner_loads_quantized(vis_folders, pictures, mode):
    options = SeeOptions(hf_repo=str(vis_folders["vis"]), image=str(pictures["stripes.jpg"]), quantize=mode, xa_start=2,
                         temp=0, temp_text=0)
    runner = SeeRunner.load(options)
    assert runner.describe()["quantize"] == mode
    linear = runner.model.lm.transformer.layers[0].gating.linear_in
    assert isinstance(linear, Int8Linear if mode == "int8" else AffineLinear)
    rng = np.random.default_rng(1)
    outs = [runner.step((0.1 * rng.standard_normal(1920)).astype(np.float32)) for _ in range(5)]
    assert all(out.pcm.shape == (1920,) for out in outs[1:])
    assert [out.gate > 0 for out in outs] == [False, False, True, True, True]


def test_see_runner_checks_the_picture_before_loading(vis_folders, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.txt"):
        SeeRunner.load(SeeOptions(hf_repo=str(tmp_path / "no-such-model"), image=str(bad)))
