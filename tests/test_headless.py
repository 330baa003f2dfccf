"""`moshi chat --input` and `moshi transcribe FILE` end to end, through the real CLI and the tiny
checkpoint folders, against Kyutai's `moshi-inference` engine on the same folder and input; and the
runner of live chat sessions against the reference models stepped as Kyutai's server.py steps them."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import soundfile
import torch

from audio import FRAME_SIZE
from engine.moshi.runner import ChatRunner
from engine.options import ModelOptions
from engine.runner import FirstFrame
from engine.tiny import write_tiny_checkpoint
from transcribe_support import published_words, said_text, stt_folder

ref_loaders = pytest.importorskip("moshi.models.loaders")
ref_inference = pytest.importorskip("moshi.run_inference")
ref_lm = pytest.importorskip("moshi.models.lm")

GREEDY = {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 25}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_checkpoint(root / kind, kind, seed=3) for kind in ("chat", "transcribe")}


@pytest.fixture(scope="module")
def speechlike(tmp_path_factory):
    """4 s at 24 kHz: vowel-like harmonic bursts with pauses, so the codes vary."""
    t = np.arange(4 * 24000) / 24000
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / 24000) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 1.3 * t) > -0.2).astype(float)
    pcm = (0.3 * voice * envelope / 2.6).astype(np.float32)
    path = tmp_path_factory.mktemp("input") / "speech.wav"
    soundfile.write(path, pcm, 24000, subtype="FLOAT")
    return path, pcm


def _reference_models(folder):
    info = ref_loaders.CheckpointInfo.from_hf_repo(
        str(folder), moshi_weights=folder / "model.safetensors", mimi_weights=folder / "mimi.safetensors",
        tokenizer=folder / "tokenizer.model", config_path=folder / "config.json",
        mimi_config_path=folder / "mimi_config.json")
    return info, info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.bfloat16)


def _reference(folder, pcm, extra_gen_config):
    info, mimi, lm = _reference_models(folder)
    tokens = []
    gen_config = {**info.lm_gen_config, **extra_gen_config}
    state = ref_inference.InferenceState(info, mimi, info.get_text_tokenizer(), lm, batch_size=1, cfg_coef=1.0,
                                         device="cpu", on_text_hook=lambda t: tokens.append(int(t[0])),
                                         **gen_config)
    with torch.no_grad():
        out = state.run(torch.from_numpy(pcm)[None, None])
    return out, tokens


def _moshi(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "moshi_tui", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_headless_chat_matches_reference(folders, speechlike, tmp_path):
    path, pcm = speechlike
    result = _moshi("chat", "--hf-repo", folders["chat"], "--input", path, "--output", tmp_path / "out.wav",
                    "--transcript", tmp_path / "words.txt", "--temp", 0, "--temp-text", 0, "--exact")
    assert result.returncode == 0, result.stderr
    out, sampled = _reference(folders["chat"], pcm, GREEDY)
    # The hook sees every text token as it is sampled; each step returns the one sampled a step
    # earlier (the acoustic delay), so the last sampled token is never said.
    expected = _pieces(folders["chat"], sampled[:-1])
    assert len(expected) > 10
    assert result.stdout.strip("\n") == expected
    (_, ref_pcm), = out
    assert (tmp_path / "words.txt").read_text() == result.stdout.strip("\n")
    ours, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000
    assert ours.shape == (ref_pcm.shape[-1],), "one 1920-sample frame out per frame in"
    # The file is 16-bit: half a step of rounding on top of the 1e-4 the models may differ by.
    np.testing.assert_allclose(ours, np.clip(ref_pcm[0].numpy(), -1, 1), rtol=0, atol=1e-4 + 0.5 / 32767)


@pytest.mark.parametrize("pipeline", ["mimi-process", "one-process"])
def test_live_chat_runner_steps_as_server_py(folders, speechlike, monkeypatch, pipeline):
    """The runner of live sessions (``ChatRunner.load`` as the engine process calls it) against the
    reference models driven as Kyutai's server.py drives them: Mimi starts over after encoding frame
    0, whose codes the LM's first step does not hear, and every frame is stepped once. Greedy.
    With Mimi in its own process each answer comes two steps later; the answers are the same."""
    monkeypatch.setattr("engine.encoder.usable_cores", lambda: 2)
    monkeypatch.setenv("MOSHI_PIPELINE" if pipeline == "mimi-process" else "MOSHI_NO_PIPELINE", "1")
    _, pcm = speechlike
    starts = range(0, len(pcm) - FRAME_SIZE + 1, FRAME_SIZE)
    _, mimi, lm = _reference_models(folders["chat"])
    gen = ref_lm.LMGen(lm, use_sampling=False)
    expected = []
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for start in starts:
            codes = mimi.encode(torch.from_numpy(pcm[start:start + FRAME_SIZE])[None, None])
            if start == 0:
                mimi.reset_streaming()
            tokens = gen.step(codes)
            expected.append(None if tokens is None else (int(tokens[0, 0, 0]), mimi.decode(tokens[:, 1:])[0, 0]))

    def run(runner):
        outs = [runner.step(pcm[start:start + FRAME_SIZE]) for start in starts]
        if runner.pipelined:
            assert all(out.pcm is None for out in outs[:2])
            outs = outs[2:] + runner.flush()
        runner.close()
        return outs

    options = ModelOptions(hf_repo=str(folders["chat"]), temp=0, temp_text=0, exact=True)
    live = ChatRunner.load(options)
    live.warmup()  # where it chooses where Mimi runs
    assert live.pipelined == (pipeline == "mimi-process")
    outs = run(live)
    torch.set_num_threads(1)
    assert [out.token for out in outs] == [None if e is None else e[0] for e in expected]
    assert len({out.token for out in outs}) > 5
    ours = np.concatenate([out.pcm for out in outs if out.pcm is not None])
    np.testing.assert_allclose(ours, torch.cat([e[1] for e in expected if e]).numpy(), rtol=0, atol=1e-4)
    # The file runs' convention hears other frames, so the comparison tells the two apart.
    file_run = run(ChatRunner.load(options, None, FirstFrame.RUN_INFERENCE))
    assert [out.token for out in file_run] != [out.token for out in outs]


def test_headless_transcribe_matches_reference(speechlike, tmp_path):
    path, pcm = speechlike
    folder = stt_folder(tmp_path / "stt")  # a tiny model that marks where words start, as real ones do
    result = _moshi("transcribe", "--hf-repo", folder, path, "--exact")
    assert result.returncode == 0, result.stderr
    _, sampled = _reference(folder, pcm, {})
    # The first frame is fed twice and the first step's output dropped, as `moshi-inference` does.
    # stdout has the words the transcript files get: the published formula's, from those tokens.
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    expected = " ".join(text for text, _, _ in published_words(sampled[1:], tokenizer, 0.0))
    assert len(expected) > 10
    assert result.stdout.strip("\n") == expected


def test_headless_transcribe_says_when_no_word_could_be_timed(folders, speechlike):
    # The plain tiny model writes text but never its end-of-padding token: no word boundary at all.
    result = _moshi("transcribe", "--hf-repo", folders["transcribe"], speechlike[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n"
    assert "no word could be timed and the transcript is empty" in result.stderr


def _pieces(folder, tokens):
    return said_text(folder / "tokenizer.model", tokens)


@pytest.mark.parametrize("content", [None, b"", b"this is not audio at all"])
def test_bad_input_file_is_one_line_error(folders, tmp_path, content):
    path = tmp_path / "input.wav"
    if content is not None:
        path.write_bytes(content)
    result = _moshi("transcribe", "--hf-repo", folders["transcribe"], path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moshi: error:") and "input.wav" in lines[0], result.stderr


def test_wrong_model_kind_is_one_line_error(folders, speechlike):
    path, _ = speechlike
    result = _moshi("transcribe", "--hf-repo", folders["chat"], path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("moshi: error:")
    assert "use `moshi chat`" in result.stderr
