"""The LM config of a checkpoint that ships none, read from its tensors' shapes.

Kyutai's candle and MLX repos of Moshi carry no config.json: their own code hard-codes Moshi 7B.
Here the sizes (widths, layer counts, vocabularies, codebooks, gated widths) come from the weights
and everything else from the Moshi 7B preset, so a smaller model of the same family loads too.
Head counts cannot be seen in a shape; they follow from the 7B's head sizes.
"""

from __future__ import annotations

import re

from ..errors import CheckpointError
from ..hub import MOSHI_7B_LM_CONFIG

TEMPORAL_HEAD_DIM = 128  # 4096 / 32
DEPTH_HEAD_DIM = 64  # 1024 / 16


def _count(shapes: dict[str, tuple], pattern: str) -> int:
    """How many distinct indices ``{i}`` the keys matching ``pattern`` have (they must be 0..n-1)."""
    regex = re.compile(pattern.replace(".", r"\.").replace("{i}", r"(\d+)"))
    found = {int(m.group(1)) for key in shapes if (m := regex.fullmatch(key))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the weights number {pattern} as {sorted(found)}, not 0 to {len(found) - 1}")
    return len(found)


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise CheckpointError(f"the {what} is {width} wide, not a multiple of Moshi's head size {head_dim}: "
                              "without a config.json its head count cannot be known")
    return width // head_dim


def _stream_delays(codebooks: int) -> list[int]:
    return [0] + [1] * (codebooks - 1) if codebooks else []


def lm_config_from_shapes(shapes: dict[str, tuple]) -> dict:
    """A config.json-like dict for ``LMConfig.from_dict``, from ``{official key name: shape}``.

    The names are the official PyTorch layout's (fused or per-step attention names). A shape that
    fits no Moshi of the 7B's family is a CheckpointError of one line.
    """
    def shape(key: str) -> tuple:
        if key not in shapes:
            raise CheckpointError(f"the weights have no {key}: not a Moshi language model")
        return tuple(shapes[key])

    text_rows, dim = shape("text_emb.weight")
    n_q = _count(shapes, "emb.{i}.weight")
    dep_q = _count(shapes, "depformer_in.{i}.weight")
    num_layers = _count(shapes, "transformer.layers.{i}.norm1.alpha")
    ffn_hidden = shape("transformer.layers.0.gating.linear_in.weight")[0] // 2
    user = n_q - dep_q  # the user's codebooks, read but not generated
    config = dict(MOSHI_7B_LM_CONFIG)
    config.update(
        dim=dim, num_heads=_heads(dim, TEMPORAL_HEAD_DIM, "temporal transformer"), num_layers=num_layers,
        text_card=text_rows - 1, card=shape("emb.0.weight")[0] - 1 if n_q else MOSHI_7B_LM_CONFIG["card"],
        n_q=n_q, dep_q=dep_q, hidden_scale=(3 * ffn_hidden / 2) / dim,
        # Moshi's delays: text and each stream's first codebook on time, the other codebooks one
        # frame late; for 16 codebooks and 8 generated this is exactly the 7B's list.
        delays=[0] + _stream_delays(dep_q) + _stream_delays(user) if dep_q else [0] * (n_q + 1),
        depformer_context=dep_q,
    )
    heads = _count(shapes, "extra_heads.{i}.weight")
    if heads:
        config.update(extra_heads_num_heads=heads, extra_heads_dim=shape("extra_heads.0.weight")[0])
    if dep_q:
        depformer_dim = shape("depformer_in.0.weight")[0]
        config.update(
            depformer_dim=depformer_dim,
            depformer_num_heads=_heads(depformer_dim, DEPTH_HEAD_DIM, "depth transformer"),
            depformer_num_layers=_count(shapes, "depformer.layers.{i}.norm1.alpha"),
            depformer_dim_feedforward=3 * shape("depformer.layers.0.gating.0.linear_in.weight")[0] // 4,
        )
    expected = {"text_linear.weight": (text_rows - 1, dim), "out_norm.alpha": (1, 1, dim)}
    for key, want in expected.items():
        if shape(key) != want:
            raise CheckpointError(f"{key} has shape {shape(key)}, expected {want} from text_emb.weight")
    return config
