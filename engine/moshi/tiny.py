"""Tiny random Moshi checkpoints: ``moshi tiny-model`` (and the tests) write them to try the app offline.

A folder looks like an official Hugging Face repo (``config.json`` naming the LM weights, the Mimi
weights and config, and a SentencePiece model), so it goes through exactly the loader users hit.
The weights are random: the model produces noise and gibberish, not speech.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..mimi.model import MimiConfig
from ..mimi.tiny import random_mimi_state
from .model import LMConfig, LMModel

# The SentencePiece model is trained on this text, so that token ids decode to real pieces.
_CORPUS = """\
Hello, how are you doing today? I am fine, thank you for asking.
The weather is nice and the sky is blue over the little town by the sea.
Would you like to talk about music, books, science, or the food you cooked last night?
Moshi listens and speaks at the same time, one frame every eighty milliseconds.
Bonjour, comment allez-vous? Il fait beau aujourd'hui et nous parlons de tout et de rien.
Numbers like one, two, three and forty-two appear in many sentences we say out loud.
A quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
"""


def _train_tokenizer() -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4),
        model_writer=model,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        # The official tokenizers: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>.
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_lm_checkpoint(folder: str | Path, lm: LMConfig, seed: int, **config: Any) -> Path:
    """A folder around a random LM of this architecture (Moshi or STT): config.json (the LM's keys
    plus ``config``), model.safetensors, a tiny Mimi, and a SentencePiece model. The LM's vocabulary
    sizes are set to the tokenizer's and to Mimi's."""
    import sentencepiece

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    (folder / "tokenizer.model").write_bytes(tokenizer)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()

    mimi = MimiConfig.tiny()
    save_file(random_mimi_state(mimi, seed), folder / "mimi.safetensors")
    (folder / "mimi_config.json").write_text(json.dumps(mimi.to_dict(), indent=2))

    lm = replace(lm, text_card=vocab, card=mimi.quantizer.bins)
    save_file(random_lm_state(lm, seed), folder / "model.safetensors")

    config = {
        **lm.to_dict(),
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
        "tokenizer_name": "tokenizer.model",
        **config,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_tiny_moshi_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """A conversation model for `moshi chat`."""
    return write_tiny_lm_checkpoint(folder, LMConfig.tiny_moshi(), seed, model_type="moshi")


def random_lm_state(cfg: LMConfig, seed: int = 0, fused: bool = True) -> dict[str, torch.Tensor]:
    """Random weights in the official bf16 file layout (fused attention names when ``fused``)."""
    generator = torch.Generator().manual_seed(seed)
    model = LMModel(cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".alpha"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            fan_in = tensor.shape[-1]
            value = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
        state[name] = value.to(torch.bfloat16)
    if fused:
        state = _fuse_attention(state)
    return state


def _fuse_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``engine.weights.split_fused_attention``: stack per-step projections as the official files do."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in state.items():
        for split, fused in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if split in name:
                prefix, rest = name.split(split)
                step = int(rest.split(".")[0])
                groups.setdefault(prefix + fused, []).append((step, tensor))
                break
        else:
            out[name] = tensor
    for name, parts in groups.items():
        out[name] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    return out
