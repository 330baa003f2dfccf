"""Write a tiny random checkpoint folder in the official layout.

The folder looks like an official Hugging Face repo (``config.json`` naming the LM weights, the
Mimi weights and config, and a SentencePiece model), so it goes through exactly the loader users
hit. The weights are random: the model produces noise and gibberish, not speech. It exists for
tests and for trying the app without downloading 16 GB.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from safetensors.torch import save_file

from .lm import LMConfig, random_lm_state
from .mimi import MimiConfig, random_mimi_state

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

KINDS = ("chat", "transcribe")


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


def write_tiny_checkpoint(folder: str | Path, kind: str = "chat", seed: int = 0) -> Path:
    """Write config.json, model.safetensors, mimi.safetensors, mimi_config.json and tokenizer.model."""
    import sentencepiece

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    (folder / "tokenizer.model").write_bytes(tokenizer)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()

    mimi = MimiConfig.tiny()
    save_file(random_mimi_state(mimi, seed), folder / "mimi.safetensors")
    (folder / "mimi_config.json").write_text(json.dumps(mimi.to_dict(), indent=2))

    lm = LMConfig.tiny_moshi() if kind == "chat" else LMConfig.tiny_stt()
    lm.text_card = vocab
    lm.card = mimi.quantizer.bins
    save_file(random_lm_state(lm, seed), folder / "model.safetensors")

    config = {
        **lm.to_dict(),
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
        "tokenizer_name": "tokenizer.model",
        "model_type": "moshi" if kind == "chat" else "stt",
    }
    if kind == "transcribe":
        config["lm_gen_config"] = {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50}
        config["stt_config"] = {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
