"""The Moshi LM and its streaming generator against the reference, on the same random weights.

Weights are written once in the official file layout (fused attention names) and loaded by both
implementations from that file.
"""

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.loading import load_lm
from engine.moshi.model import LMConfig
from engine.moshi.tiny import random_lm_state

ref_loaders = pytest.importorskip("moshi.models.loaders")
ref_lm = pytest.importorskip("moshi.models.lm")


def _pair(path, cfg, dtype, sampling):
    ref = ref_loaders.get_moshi_lm(str(path), cfg.to_dict(), device="cpu", dtype=dtype)
    ref_gen = ref_lm.LMGen(ref, use_sampling=sampling.temp > 0, temp=sampling.temp, temp_text=sampling.temp_text,
                           top_k=sampling.top_k, top_k_text=sampling.top_k_text)
    return ref_gen, LMGen(load_lm(path, cfg, dtype=dtype), sampling)


def _user_codes(cfg, steps, batch, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.card, (steps, batch, cfg.n_q - cfg.dep_q, 1), generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moshi_greedy_50_steps_identical(lm_checkpoints, dtype):
    cfg = LMConfig.tiny_moshi()
    ref_gen, gen = _pair(lm_checkpoints["moshi"], cfg, dtype, Sampling.greedy())
    codes = _user_codes(cfg, 50, 1)
    texts = set()
    with ref_gen.streaming(1), gen.streaming(1):
        for t in range(50):
            expected, got = ref_gen.step(codes[t]), gen.step(codes[t])
            if t == 0:  # the acoustic delay: nothing to return after the first step
                assert expected is None and got is None
                continue
            assert got is not None and torch.equal(expected, got), f"step {t}"
            texts.add(int(got[0, 0, 0]))
    assert len(texts) > 5, "degenerate random model: the comparison would prove little"


def test_moshi_sampling_with_same_seed_identical(lm_checkpoints):
    """Same RNG draws in the same order: even sampled tokens agree."""
    cfg = LMConfig.tiny_moshi()
    ref_gen, gen = _pair(lm_checkpoints["moshi"], cfg, torch.float32, Sampling())
    codes = _user_codes(cfg, 30, 1)
    with ref_gen.streaming(1), gen.streaming(1):
        for t in range(30):
            torch.manual_seed(t)
            expected = ref_gen.step(codes[t])
            torch.manual_seed(t)
            got = gen.step(codes[t])
            assert (expected is None and got is None) or torch.equal(expected, got), f"step {t}"


def test_stt_extra_heads_match(lm_checkpoints):
    cfg = LMConfig.tiny_stt()
    ref_gen, gen = _pair(lm_checkpoints["stt"], cfg, torch.float32, Sampling.greedy())
    codes = _user_codes(cfg, 40, 1)
    with ref_gen.streaming(1), gen.streaming(1):
        for t in range(40):
            expected, expected_heads = ref_gen.step_with_extra_heads(codes[t])
            out = gen.step_full(codes[t])
            got, heads = out.tokens, gen.lm.extra_head_probs(out.hidden)
            assert torch.equal(expected, got), f"step {t}"  # STT has no delay: a token from step 0 on
            assert len(heads) == len(expected_heads) == 4
            for a, b in zip(expected_heads, heads):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["moshi", "stt"])
def test_batch_of_two_with_one_slot_reset(lm_checkpoints, name):
    cfg = LMConfig.tiny_moshi() if name == "moshi" else LMConfig.tiny_stt()
    path = lm_checkpoints[name]
    codes = _user_codes(cfg, 30, 2)
    reset_at = 12
    mask = torch.tensor([False, True])

    def reference_run(reset: bool):
        ref_gen, _ = _pair(path, cfg, torch.float32, Sampling.greedy())
        outs = []
        with ref_gen.streaming(2):
            for t in range(30):
                if reset and t == reset_at:
                    ref_gen.reset_streaming(mask)
                outs.append(ref_gen.step(codes[t]))
        return outs

    with_reset, without_reset = reference_run(True), reference_run(False)
    _, gen = _pair(path, cfg, torch.float32, Sampling.greedy())
    with gen.streaming(2):
        for t in range(30):
            if t == reset_at:
                gen.reset_streaming(mask)
            got = gen.step(codes[t])
            if t < cfg.max_delay:
                assert got is None
                continue
            # Slot 0 is unaffected by slot 1's reset.
            assert torch.equal(got[0], without_reset[t][0]), f"slot 0, step {t}"
            if with_reset[t] is not None:
                assert torch.equal(got[1], with_reset[t][1]), f"slot 1, step {t}"
            else:  # the reference drops the whole batch's frame; we mark only the restarted slot
                assert (got[1] == -2).all()


def test_loader_names_missing_and_misshaped_tensors(lm_checkpoints, tmp_path):
    cfg = LMConfig.tiny_moshi()
    state = random_lm_state(cfg, seed=2)
    state.pop("linears.3.weight")
    state["out_norm.alpha"] = torch.ones(1, 1, cfg.dim + 1, dtype=torch.bfloat16)
    state["not_a_weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as err:
        load_lm(path, cfg)
    message = str(err.value)
    assert "linears.3.weight" in message
    assert "out_norm.alpha (1, 1, 65) (expected (1, 1, 64))" in message
    assert "not_a_weight" in message


def test_loader_accepts_split_attention_names(lm_checkpoints, tmp_path):
    """The q8 files store per-step names (``in_projs.{k}.weight``); both layouts give the same model."""
    cfg = LMConfig.tiny_moshi()
    split = random_lm_state(cfg, seed=1, fused=False)
    assert "depformer.layers.0.self_attn.in_projs.7.weight" in split
    save_file(split, tmp_path / "split.safetensors")
    fused_model = load_lm(lm_checkpoints["moshi"], cfg)
    split_model = load_lm(tmp_path / "split.safetensors", cfg)
    for (name, a), (_, b) in zip(fused_model.state_dict().items(), split_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_ffn_width_comes_from_the_weights(lm_checkpoints):
    """A config whose hidden_scale rule gives the wrong width still loads: the gated FFN's width is
    read from the weights (the reference's rule gives 5376 for STT-1B, whose weights are 5632 wide)."""
    cfg = LMConfig.tiny_moshi()
    wrong = LMConfig.from_dict({**cfg.to_dict(), "hidden_scale": 4.0})
    assert wrong.ffn_hidden != cfg.ffn_hidden
    model = load_lm(lm_checkpoints["moshi"], wrong)
    assert model.cfg.ffn_hidden == cfg.ffn_hidden
