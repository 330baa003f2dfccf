"""Shared pieces of the `moshi transcribe` tests: tiny STT folders, inputs, the reference, the CLI,
and an independent implementation of the published word-timestamp formula."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch
from safetensors.torch import load_file, save_file

from engine.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "transcript.schema.json"
FRAME_RATE = 12.5


def stt_folder(folder: Path, seed: int = 3, stt_config: dict | None = None) -> Path:
    """A tiny random STT checkpoint (with VAD heads) whose text stream looks like a real one.

    Random weights rarely pick padding (3) or end of padding (0), so words would never end. Scaling
    those two rows of the text head makes them common, as in real transcripts; both engines load
    the same file, so the comparison stays exact.
    """
    write_tiny_checkpoint(folder, "transcribe", seed=seed)
    state = load_file(folder / "model.safetensors")
    state["text_linear.weight"][3] *= 3.0
    state["text_linear.weight"][0] *= 2.5
    save_file(state, folder / "model.safetensors")
    if stt_config is not None:
        config = json.loads((folder / "config.json").read_text())
        config["stt_config"] = stt_config
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def noise(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Bursts of coloured noise with gaps, so the codes and the model's output vary."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    signal = np.convolve(rng.standard_normal(n), np.ones(4) / 4, mode="same")
    envelope = (np.sin(2 * np.pi * 0.9 * np.arange(n) / rate + seed) > -0.3)
    return (0.3 * signal * envelope).astype(np.float32)


def write_audio(path: Path, seconds: float, rate: int = 24000, seed: int = 0, subtype: str | None = None) -> Path:
    soundfile.write(path, noise(seconds, rate, seed), rate, subtype=subtype)
    return path


def reference_tokens(folder: Path, pcm: np.ndarray) -> list[int]:
    """Kyutai's `moshi-inference` on the folder: the text tokens it outputs (the first step's is dropped)."""
    _, sampled = reference_run(folder, pcm)
    # It feeds the first frame twice and keeps the second step's token onwards.
    return sampled[1:]


def reference_run(folder: Path, pcm: np.ndarray, **gen_config) -> tuple[list, list[int]]:
    """Kyutai's `moshi-inference` on a tiny folder, with its lm_gen_config updated by ``gen_config``:
    what it outputs (a list of (text, pcm)) and every text token it samples."""
    from moshi.models import loaders
    from moshi.run_inference import InferenceState

    info = loaders.CheckpointInfo.from_hf_repo(
        str(folder), moshi_weights=folder / "model.safetensors", mimi_weights=folder / "mimi.safetensors",
        tokenizer=folder / "tokenizer.model", config_path=folder / "config.json",
        mimi_config_path=folder / "mimi_config.json")
    sampled = []
    state = InferenceState(info, info.get_mimi(device="cpu"), info.get_text_tokenizer(),
                           info.get_moshi(device="cpu", dtype=torch.bfloat16), batch_size=1, cfg_coef=1.0,
                           device="cpu", on_text_hook=lambda t: sampled.append(int(t[0])),
                           **{**info.lm_gen_config, **gen_config})
    with torch.no_grad():
        out = state.run(torch.from_numpy(pcm)[None, None])
    return out, sampled


def published_words(tokens: list[int], tokenizer, offset_seconds: float) -> list[tuple[str, float, float]]:
    """`tokens_to_timestamped_text` of Kyutai's delayed-streams-modeling STT scripts, written out
    plainly on a whole token list.

    Where the published code slices with a fractional end (the last word's one-second cap), tokens
    strictly before that position are the ones decoded.
    """
    tokens = np.asarray(tokens)
    out = []

    def stamp(position):
        return max(0, position / FRAME_RATE - offset_seconds)

    def segment(start, end):
        chosen = tokens[start:math.ceil(end)]
        text = tokenizer.decode([int(t) for t in chosen if t > 3])
        words = text.split()
        if len(words) == 1:
            out.append((text.strip(), stamp(start), stamp(end)))
        elif len(words) > 1:
            for word in words[:-1]:
                n = len(tokenizer.encode(word))
                out.append((word, stamp(start), stamp(start + n)))
                start += n
            out.append((words[-1], stamp(start), stamp(end)))

    boundaries = [int(i) for i in np.flatnonzero(tokens == 0)]
    if not boundaries:
        return []
    for a, b in zip(boundaries, boundaries[1:]):
        segment(a + 1, b)
    last = boundaries[-1] + 1
    eos = np.flatnonzero(tokens[last:] == tokenizer.eos_id())
    end = last + int(eos[0]) if len(eos) else min(len(tokens), last + FRAME_RATE)
    segment(last, end)
    return out


def moshi_command(*args) -> list[str]:
    return [sys.executable, "-m", "moshi_tui", *map(str, args)]


# One torch thread in the CLI processes too: the machines have two shared cores.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def moshi(*args, stdin=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(moshi_command(*args), capture_output=True, text=True, env=ENV, timeout=timeout,
                          stdin=stdin)


def said_text(tokenizer: Path, tokens: list[int]) -> str:
    """The text a person reads: no special token (ids 0 to 3: end of padding, <unk>, <s>, </s>, padding)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    return "".join(sp.id_to_piece(t).replace("▁", " ") for t in tokens if t > 3)
