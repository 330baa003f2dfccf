"""Hugging Face transformers checkpoints (MimiModel, MoshiForConditionalGeneration,
KyutaiSpeechToTextForConditionalGeneration) load through the user's loader, with no conversion step.

The checkpoints are written by transformers' own ``save_pretrained`` from tiny random models, and
their tokenizer.json by transformers' own SentencePiece converter; transformers' forward is the
oracle for codes and logits. The end-to-end runs compare `moshi chat` and `moshi transcribe` on the
transformers folder with Kyutai's reference engine on the same weights in the official layout.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import soundfile
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointError
from engine.formats import transformers as trfs
from engine.hub import CheckpointInfo
from engine.mimi.loading import load_checkpoint_mimi, load_mimi
from engine.mimi.model import MimiConfig
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.loading import load_checkpoint_lm
from engine.moshi.tiny import _train_tokenizer
from test_hub import closed_port, hf_env, hub, resolve_in_process  # noqa: F401 (hub: a fixture)
from test_hub import moshi as hub_moshi
from transcribe_support import noise, published_words, reference_run, reference_tokens

hf = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import MoshiConverter  # noqa: E402

CPU = torch.device("cpu")
MIMI = dict(hidden_size=64, num_filters=8, codebook_dim=16, vector_quantization_hidden_dimension=16,
            num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
            upsample_groups=64)
DEP_Q = 4


def _randomize(model, seed):
    """Weights at the scale trained ones have (transformers' init keeps activations tiny, so a
    wrong layout would hardly show), and codebooks drawn at the latent's scale with positive usage
    (default codebooks are all zero: every code would be 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            shape = tensor.shape
            if name.endswith("cluster_usage"):
                tensor.copy_(torch.rand(shape, generator=generator) * 2 + 0.5)
            elif name.endswith("embed_sum"):
                tensor.copy_(torch.randn(shape, generator=generator) * 0.3)  # times the usage, below
            elif name.endswith("initialized"):
                tensor.fill_(1)
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * torch.randn(shape, generator=generator))
            elif name.endswith(("bias", "scale")):
                tensor.copy_(0.1 * torch.rand(shape, generator=generator))
            else:
                fan_in = shape[-1] if tensor.dim() == 2 or "depth_decoder" in name else math.prod(shape[1:])
                tensor.copy_(torch.randn(shape, generator=generator) / fan_in**0.5)
        for name, tensor in model.state_dict().items():
            if name.endswith("embed_sum"):
                tensor.mul_(model.state_dict()[name.replace("embed_sum", "cluster_usage")][:, None])
    return model.eval()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(_train_tokenizer())
    return path


def _save(model, folder, spm, **kwargs):
    model.save_pretrained(folder, **kwargs)
    MoshiConverter(str(spm)).converted().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def mimi_folder(tmp_path_factory):
    model = _randomize(hf.MimiModel(hf.MimiConfig(**MIMI)), seed=1)
    folder = tmp_path_factory.mktemp("mimi")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def moshi_folder(tmp_path_factory, spm):
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm)).get_piece_size()
    config = hf.MoshiConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=100, sliding_window=100, ffn_dim=352, num_codebooks=DEP_Q, audio_vocab_size=2048,
        audio_encoder_config={"model_type": "mimi", **MIMI},
        depth_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  ffn_dim=176, sliding_window=DEP_Q, max_position_embeddings=DEP_Q + 1))
    model = _randomize(hf.MoshiForConditionalGeneration(config), seed=2)
    # Sharded, as the 7B checkpoints are: the loader follows model.safetensors.index.json.
    folder = _save(model, tmp_path_factory.mktemp("moshi"), spm, max_shard_size="1MB")
    assert (folder / trfs.SHARD_INDEX).is_file()
    return folder, model


@pytest.fixture(scope="module")
def stt_folder(tmp_path_factory, spm):
    text_card = sentencepiece.SentencePieceProcessor(model_file=str(spm)).get_piece_size()
    vocab = text_card + 1
    config = hf.KyutaiSpeechToTextConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=352,
        max_position_embeddings=100, sliding_window=100,
        rope_parameters={"rope_theta": 100_000.0, "rope_type": "default"},  # STT's RoPE period
        audio_pad_token_id=vocab + 32 * 2049, bos_token_id=text_card, codec_config={"model_type": "mimi", **MIMI})
    model = _randomize(hf.KyutaiSpeechToTextForConditionalGeneration(config), seed=3)
    with torch.no_grad():
        # The padding row of the merged table embeds to zeros, and the published head's last row
        # (the text_card logit) is zero. Random heads rarely pick padding (3) or end of padding (0),
        # so words would never end: those rows are scaled up, as in real transcripts.
        model.model.embed_tokens.embed_tokens.weight[-1] = 0
        model.lm_head.weight[-1] = 0
        model.lm_head.weight[3] *= 3.0
        model.lm_head.weight[0] *= 2.5
    folder = _save(model, tmp_path_factory.mktemp("stt"), spm)
    (folder / trfs.PREPROCESSOR).write_text(json.dumps({"audio_delay_seconds": 0.5,
                                                        "audio_silence_prefix_seconds": 0.0}))
    return folder, model


def _speech(seconds=2.0, seed=0):
    return torch.from_numpy(noise(seconds, seed=seed))[None, None]


def test_mimi_codes_and_audio_are_transformers(mimi_folder):
    folder, model = mimi_folder
    config = MimiConfig.from_dict(trfs.mimi_config(json.loads((folder / "config.json").read_text()), "mimi"))
    mimi = load_mimi(folder / "model.safetensors", config, num_codebooks=32)
    codes = {}
    with torch.no_grad():
        for seed in (0, 1):
            x = _speech(seed=seed)
            expected = model.encode(x).audio_codes
            codes[seed] = mimi.encode(x)
            assert torch.equal(codes[seed], expected)
        audio = model.decode(codes[0]).audio_values
        ours = mimi.decode(codes[0])
    assert (ours - audio).abs().max() <= 1e-5 * audio.abs().max()
    # Non-degenerate: codes spread over the codebooks and follow the input.
    assert len(codes[0][0, 0].unique()) > 10 and len(codes[0][0, 31].unique()) > 10
    assert (codes[0] != codes[1]).float().mean() > 0.5


def test_mimi_config_of_older_transformers_maps_the_same(mimi_folder):
    """Files from transformers 4.x say rope_theta and frame_rate at the top level, and torch_dtype."""
    folder, _ = mimi_folder
    raw = json.loads((folder / "config.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("rope_parameters", "_frame_rate", "dtype")}
    old.update(rope_theta=raw["rope_parameters"]["rope_theta"], frame_rate=12.5, torch_dtype="float32",
               transformers_version="4.45.0.dev0")
    assert trfs.mimi_config(old, "old") == trfs.mimi_config(raw, "new")


def test_a_checkpoint_names_kyutai_mimi_as_its_codec(mimi_folder, tmp_path):
    """A Kyutai config.json may take its Mimi (weights and config) from a transformers MimiModel repo."""
    folder, model = mimi_folder
    root = tmp_path / "models"
    chat = root / "kyutai" / "chat"
    hub_like = root / "kyutai" / "mimi"
    hub_like.parent.mkdir(parents=True)
    os.symlink(folder, hub_like)
    from engine.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(chat, "chat")
    config = json.loads((chat / "config.json").read_text())
    config.update(mimi_name="hf://kyutai/mimi/model.safetensors", mimi_config_name="hf://kyutai/mimi/config.json")
    (chat / "config.json").write_text(json.dumps(config))
    mimi = load_checkpoint_mimi(CheckpointInfo.resolve(chat), 32, CPU)
    with torch.no_grad():
        assert torch.equal(mimi.encode(_speech()), model.encode(_speech()).audio_codes)


def _lm(folder, dtype=torch.float32):
    return load_checkpoint_lm(CheckpointInfo.resolve(folder), CPU, dtype)


def test_moshi_logits_are_transformers(moshi_folder):
    folder, model = moshi_folder
    lm = _lm(folder)
    generator = torch.Generator().manual_seed(0)
    B, T = 2, 6
    text = torch.randint(0, lm.cfg.text_card, (B, T), generator=generator)
    audio = torch.randint(0, 2048, (B, 2 * DEP_Q, T), generator=generator)
    with torch.no_grad():
        expected = model(input_ids=text, moshi_audio_codes=audio[:, :DEP_Q], user_audio_codes=audio[:, DEP_Q:],
                         use_cache=False).logits
        hidden, logits = lm.forward_text(torch.cat([text[:, None], audio], dim=1))
        assert (logits[:, 0] - expected).abs().max() < 1e-5
        # The depth transformer on the last step's output: the text token, then codebooks 0..dep_q-2.
        h = hidden[:, -1:]
        inputs = torch.cat([text[:, -1:], audio[:, :DEP_Q - 1, -1]], dim=1)
        depth_expected = model.depth_decoder(input_ids=inputs, last_hidden_state=h.expand(B, DEP_Q, -1)).logits
        with lm.depformer.streaming(B):
            depth = torch.cat([lm.forward_depformer(k, inputs[:, k:k + 1], h) for k in range(DEP_Q)], dim=1)
    assert (depth - depth_expected).abs().max() < 1e-5
    # Non-degenerate: each batch item and step gets its own logits, far from flat.
    assert (expected[0] - expected[1]).abs().max() > 1 and expected.std() > 0.5
    assert (depth_expected[0] - depth_expected[1]).abs().max() > 1


def test_stt_logits_and_greedy_tokens_are_transformers(stt_folder):
    folder, model = stt_folder
    info = CheckpointInfo.resolve(folder)
    assert info.stt_config == {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
    lm = load_checkpoint_lm(info, CPU, torch.float32)
    mimi = load_checkpoint_mimi(info, 32, CPU)
    with torch.no_grad():
        codes = mimi.encode(_speech(1.6))  # [1, 32, 20]
    frames = codes.shape[-1]
    # Our streaming generation, greedy: step t reads the text of step t - 1 and the codes of frame t.
    gen = LMGen(lm, Sampling.greedy())
    with gen.streaming(1):
        ours = [int(gen.step(codes[:, :, t:t + 1])[0, 0, 0]) for t in range(frames)]
    # transformers' forward on the same growing sequence, from its own start tokens; it never
    # sees frame 0's codes either (the first step reads only start tokens).
    config = model.config
    start_row = torch.full((1, 1, 33), config.audio_bos_token_id)
    start_row[0, 0, 0] = config.bos_token_id
    rows, expected = [start_row], []
    with torch.no_grad():
        for t in range(frames):
            logits = model(input_ids=torch.cat(rows, dim=1)).logits[0, -1, :lm.cfg.text_card]
            expected.append(int(logits.argmax()))
            if t + 1 < frames:
                rows.append(torch.cat([torch.tensor([[[expected[-1]]]]), codes[:, :, t + 1].view(1, 1, 32)], dim=2))
        inputs = torch.cat(rows, dim=1)
        full = model(input_ids=inputs).logits[..., :lm.cfg.text_card]
        _, ours_logits = lm.forward_text(inputs.transpose(1, 2))
    assert (ours_logits[0, 0] - full[0]).abs().max() < 1e-5
    assert ours == expected
    assert len(set(ours)) > 3


def _moshi(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "moshi_tui", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _official_folder(hf_folder, folder, spm):
    """The same weights in the official layout, from what our loader read, for Kyutai's reference engine."""
    info = CheckpointInfo.resolve(hf_folder)
    lm = load_checkpoint_lm(info, CPU, torch.float32)
    mimi = load_checkpoint_mimi(info, 32, CPU)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, folder / "mimi.safetensors")
    (folder / "mimi_config.json").write_text(json.dumps(mimi.cfg.to_dict()))
    (folder / "tokenizer.model").write_bytes(spm.read_bytes())
    config = {**lm.cfg.to_dict(), "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
              "mimi_config_name": "mimi_config.json", "tokenizer_name": "tokenizer.model",
              "model_type": info.model_type, "lm_gen_config": info.lm_gen_config, "stt_config": info.stt_config}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_moshi_chat_on_a_transformers_folder(moshi_folder, spm, tmp_path):
    """`moshi chat --hf-repo` on the transformers folder says and writes what Kyutai's
    `moshi-inference` does on the same weights in the official layout (greedy)."""
    folder, _ = moshi_folder
    pcm = noise(3.0, seed=4)
    soundfile.write(tmp_path / "in.wav", pcm, 24000, subtype="FLOAT")
    result = _moshi("chat", "--hf-repo", folder, "--input", tmp_path / "in.wav", "--output", tmp_path / "out.wav",
                    "--temp", 0, "--temp-text", 0, "--exact")
    assert result.returncode == 0, result.stderr
    official = _official_folder(folder, tmp_path / "official", spm)
    out, sampled = reference_run(official, pcm, temp=0.0, temp_text=0.0, top_k=250, top_k_text=25)
    (_, ref_pcm), = out
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    expected = "".join(tokenizer.id_to_piece(t).replace("▁", " ") for t in sampled[:-1] if t > 3)
    assert len(expected) > 10
    assert result.stdout.strip("\n") == expected
    ours, _ = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert ours.shape == (ref_pcm.shape[-1],)
    np.testing.assert_allclose(ours, np.clip(ref_pcm[0].numpy(), -1, 1), rtol=0, atol=1e-4 + 0.5 / 32767)


def test_moshi_transcribe_on_a_transformers_folder(stt_folder, spm, tmp_path):
    folder, _ = stt_folder
    pcm = noise(3.0, seed=5)
    soundfile.write(tmp_path / "in.wav", pcm, 24000, subtype="FLOAT")
    result = _moshi("transcribe", "--hf-repo", folder, tmp_path / "in.wav", "--exact")
    assert result.returncode == 0, result.stderr
    official = _official_folder(folder, tmp_path / "official", spm)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    expected = " ".join(text for text, _, _ in published_words(reference_tokens(official, pcm), tokenizer, 0.0))
    assert len(expected) > 10
    assert result.stdout.strip("\n") == expected


def test_tokenizer_json_reads_as_sentencepiece(spm, moshi_folder):
    folder, _ = moshi_folder
    ours = trfs.JsonTokenizer(folder / "tokenizer.json")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    ids = list(range(4, reference.get_piece_size()))
    assert [ours.id_to_piece(i) for i in ids] == [reference.id_to_piece(i) for i in ids]
    assert ours.decode(ids[5:40]) == reference.decode(ids[5:40])
    for text in ("Hello, how are you doing today?", "Bonjour, il fait beau"):
        assert ours.encode(text) == reference.encode(text)
    assert ours.eos_id() == reference.eos_id()


def test_a_transformers_architecture_we_do_not_load_is_one_line(tmp_path, mimi_folder):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "transformers_version": "5.0.0"}))
    audio = tmp_path / "in.wav"
    soundfile.write(audio, noise(0.5), 24000)
    result = _moshi("transcribe", "--hf-repo", folder, audio)
    assert _error_line(result).endswith("is a transformers LlamaForCausalLM checkpoint; moshi runs "
                                        "MoshiForConditionalGeneration and KyutaiSpeechToTextForConditionalGeneration "
                                        "checkpoints, and a MimiModel as a model's codec")
    result = _moshi("chat", "--hf-repo", mimi_folder[0], "--input", audio, "--output", tmp_path / "out.wav")
    assert "is a Mimi codec (MimiModel), not a model to talk to" in _error_line(result)
    assert not (tmp_path / "out.wav").exists()


def _error_line(result):
    """The one error line of a failed run (progress lines before it), with no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("moshi: error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def test_grouped_query_attention_is_refused_before_loading():
    raw = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        trfs.lm_config({**raw, "model_type": "moshi"}, "moshi", "x")


def test_download_of_a_sharded_transformers_repo_then_offline(moshi_folder, tmp_path, hub):
    """`moshi download` fetches config.json, the shard index, every shard and tokenizer.json; the
    cache then serves the checkpoint without the network, shards beside their index."""
    folder, _ = moshi_folder
    repo = "kmhf/hf-moshiko"
    hub.repos[repo] = {path.name: path.read_bytes() for path in folder.iterdir()}
    done, _ = hub_moshi("download", repo, env=hf_env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    fetched = {name for method, _, _, name in hub.requests if method == "GET"}
    assert fetched == set(hub.repos[repo]) - {"generation_config.json"}
    assert len([name for name in fetched if name.endswith(".safetensors")]) > 1
    info = resolve_in_process(repo, hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1"))
    index = Path(info["lm_weights"])
    assert index.name == trfs.SHARD_INDEX and info["mimi_weights"] == str(index)
    assert all((index.parent / shard).is_file() for shard in json.loads(index.read_text())["weight_map"].values())
    assert info["model_type"] == "moshi" and info["lm_config"]["dep_q"] == DEP_Q


@pytest.mark.parametrize("content", ["not json", '{"audio_delay_seconds": "soon"}', '{"audio_delay_seconds": -1}'])
def test_a_bad_preprocessor_config_is_one_line(tmp_path, content):
    path = tmp_path / trfs.PREPROCESSOR
    path.write_text(content)
    with pytest.raises(CheckpointError, match=trfs.PREPROCESSOR):
        trfs._stt_config(path)
