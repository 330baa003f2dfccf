"""Our streaming transformer against the reference's, on the same random weights."""

from dataclasses import replace

import pytest
import torch

from engine.transformer import KVCacheState, Transformer, TransformerConfig

reference = pytest.importorskip("moshi.modules.transformer")

MIMI_LIKE = (
    dict(d_model=64, num_heads=4, num_layers=2, causal=True, layer_scale=0.01, context=10, max_period=10000,
         gating="none", norm="layer_norm", positional_embedding="rope", dim_feedforward=128),
    TransformerConfig(64, 4, 2, 128, 10, norm="layer_norm", ffn="gelu", layer_scale=True),
    2,  # steps per call, as Mimi's 25 Hz transformer under 12.5 Hz frames
)
LM_LIKE = (
    dict(d_model=64, num_heads=4, num_layers=2, causal=True, layer_scale=None, context=12, max_period=100000,
         gating="silu", norm="rms_norm_f32", positional_embedding="rope", dim_feedforward=264),
    TransformerConfig(64, 4, 2, 176, 12, max_period=100000.0),
    1,
)
DEPTH_LIKE = (
    dict(d_model=32, num_heads=4, num_layers=2, causal=True, layer_scale=None, context=None, gating="silu",
         norm="rms_norm_f32", positional_embedding="none", dim_feedforward=132, weights_per_step=4),
    TransformerConfig(32, 4, 2, 88, None, max_period=None, weights_per_step=4),
    1,
)


def _pair(ref_kwargs, cfg, dtype):
    torch.manual_seed(0)
    ref = reference.StreamingTransformer(**ref_kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.05)
    ours = Transformer(cfg).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_same_steps_through_a_reset(ref, ours, x, reset_at, mask):
    """Both stream ``x`` [B, T, dim] one step at a time, resetting the ``mask`` slots at ``reset_at``."""
    with ref.streaming(x.shape[0]), ours.streaming(x.shape[0]):
        for t in range(x.shape[1]):
            if t == reset_at:
                ref.reset_streaming(mask)
                ours.reset_streaming(mask)
            assert torch.equal(ref(x[:, t:t + 1]), ours(x[:, t:t + 1])), f"step {t}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", [MIMI_LIKE, LM_LIKE, DEPTH_LIKE], ids=["mimi", "lm", "depth"])
@torch.no_grad()
def test_streaming_matches_reference_bit_for_bit(variant, dtype):
    ref_kwargs, cfg, per_call = variant
    ref, ours = _pair(ref_kwargs, cfg, dtype)
    calls = cfg.weights_per_step or 15  # past the ring capacity, so the ring wraps
    x = torch.randn(2, per_call * calls, cfg.dim, dtype=dtype)
    with ref.streaming(2), ours.streaming(2):
        for i in range(calls):
            chunk = x[:, i * per_call:(i + 1) * per_call]
            assert torch.equal(ref(chunk), ours(chunk)), f"call {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_long_ring_attended_over_its_written_blocks_matches_reference_bit_for_bit(dtype):
    """With a ring longer than the fused kernel's block, our CPU path attends only over the
    blocks written so far: the same bits as the reference over its whole masked ring, before the
    wrap, across it, and after a slot reset."""
    ref_kwargs, cfg, _ = LM_LIKE
    ref_kwargs, cfg = dict(ref_kwargs, context=1100), replace(cfg, context=1100)
    ref, ours = _pair(ref_kwargs, cfg, dtype)
    _assert_same_steps_through_a_reset(ref, ours, torch.randn(2, 1300, cfg.dim, dtype=dtype), 600,
                                       torch.tensor([True, False]))


@torch.no_grad()
def test_batch_forward_matches_reference():
    ref_kwargs, cfg, _ = MIMI_LIKE
    ref, ours = _pair(ref_kwargs, cfg, torch.float32)
    x = torch.randn(2, 30, cfg.dim)
    assert torch.equal(ref(x), ours(x))


@torch.no_grad()
def test_reset_one_slot_restarts_only_that_slot():
    ref_kwargs, cfg, _ = LM_LIKE
    ref, ours = _pair(ref_kwargs, cfg, torch.float32)
    x = torch.randn(2, 20, cfg.dim)
    _assert_same_steps_through_a_reset(ref, ours, x, 9, torch.tensor([False, True]))
    # and the reset slot really restarted: it now matches a fresh stream fed from step 9
    with ours.streaming(1):
        fresh = [ours(x[1:, t:t + 1]) for t in range(9, 20)]
    with ours.streaming(2):
        for t in range(9):
            ours(x[:, t:t + 1])
        ours.reset_streaming(torch.tensor([False, True]))
        again = [ours(x[:, t:t + 1])[1:] for t in range(9, 20)]
    for a, b in zip(fresh, again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("context", [None, 5, 16])
def test_a_steps_mask_is_the_one_its_slots_positions_give(context):
    """``KVCacheState.step_mask`` (what the native attention kernel is given) against the mask built
    from ``append``'s positions, as the other attention paths build it: a ring of 16 slots, three
    rows through 40 steps (past two wraps), the middle row reset at step 21."""
    state = KVCacheState(batch_size=3, device=torch.device("cpu"), cache=torch.zeros(2, 3, 1, 16, 4),
                         offset=torch.tensor([0, 3, 7]))
    step = torch.zeros(3, 1, 1, 4)
    reach = []
    for t in range(40):
        if t == 21:
            state.reset(torch.tensor([False, True, False]))
        first = 16 if t % 2 else min(t + 1, 16)
        _, _, positions = state.append(step, step, first)
        distance = state.offset.view(-1, 1) - positions
        expected = (positions >= 0) & (distance >= 0) & (distance < (context or 10**9))
        got = state.step_mask(first, context)
        assert torch.equal(got, expected), t
        reach.append(got.float().mean())
        state.offset += 1
    assert 0 < min(reach) and max(reach) > min(reach) and min(reach) < 1  # some slots, never all of them always
