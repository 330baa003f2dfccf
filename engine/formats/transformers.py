"""Hugging Face transformers checkpoints: ``MoshiForConditionalGeneration`` (``kmhf/hf-moshiko``),
``KyutaiSpeechToTextForConditionalGeneration`` (``kyutai/stt-*-trfs``) and ``MimiModel`` (``kyutai/mimi``).

Their config.json has transformers' keys, Mimi lives inside the same file (``audio_encoder.*``,
``codec_model.*``), and the tensors are re-laid out: q and k rows permuted for rotate-half RoPE,
each attention split into q/k/v, the depth transformer's per-codebook weights stacked, and the STT
embeddings merged into one table. This module reads all of it back into the official layout, in
memory, so the rest of the engine sees an ordinary checkpoint.

Importing it loads no torch: ``engine/hub.py`` maps the configs here without building anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from ..moshi.model import LMModel

MOSHI = "moshi"
STT = "kyutai_speech_to_text"
MIMI = "mimi"
# By model_type: the architecture we load, and where its Mimi lives in its file.
ARCHITECTURES = {
    MOSHI: "MoshiForConditionalGeneration",
    STT: "KyutaiSpeechToTextForConditionalGeneration",
    MIMI: "MimiModel",
}
MIMI_PREFIXES = {MOSHI: "audio_encoder.", STT: "codec_model.", MIMI: ""}
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
PREPROCESSOR = "preprocessor_config.json"

# A tensor each LM layout has and no other layout has.
_MOSHI_KEY = "decoder.model.embed_tokens.weight"
_STT_KEY = "model.embed_tokens.embed_tokens.weight"
_MIMI_KEY = "quantizer.semantic_residual_vector_quantizer.input_proj.weight"


# ---------------------------------------------------------------- config.json → ours


def is_transformers_config(raw: dict) -> bool:
    """Whether a config.json was written by transformers (``save_pretrained`` always writes these)."""
    return "transformers_version" in raw or "architectures" in raw


def check_architecture(raw: dict, where: str) -> str:
    """The model_type of a transformers config we load, or a one-line CheckpointError."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    known = ARCHITECTURES.get(model_type)
    if known is None or (architectures and known not in architectures):
        name = ", ".join(architectures) or f"model_type {model_type!r}"
        raise CheckpointError(f"{where} is a transformers {name} checkpoint; moshi runs "
                              f"{ARCHITECTURES[MOSHI]} and {ARCHITECTURES[STT]} checkpoints, "
                              f"and a {ARCHITECTURES[MIMI]} as a model's codec")
    return model_type


def _get(raw: dict, key: str, where: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None:
        raise CheckpointError(f"{where}: config.json has no {key}")
    return value


def _rope_theta(raw: dict, where: str) -> float:
    # transformers 5 writes rope_parameters.rope_theta; older files have rope_theta.
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))
    return float(_get({"rope_theta": theta}, "rope_theta", where))


def _check_heads(raw: dict, where: str) -> None:
    heads = _get(raw, "num_attention_heads", where)
    if raw.get("num_key_value_heads", heads) != heads:
        raise CheckpointError(f"{where}: grouped-query attention (num_key_value_heads "
                              f"{raw['num_key_value_heads']} != num_attention_heads {heads}) is not supported")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if head_dim * heads != raw["hidden_size"]:
        raise CheckpointError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {raw['hidden_size']}")


def mimi_config(raw: dict, where: str) -> dict:
    """A transformers ``MimiConfig`` as the reference's Mimi config dict (what ``MimiConfig.from_dict`` reads)."""
    if raw.get("model_type", MIMI) != MIMI:
        raise CheckpointError(f"{where} is a transformers {raw['model_type']!r} config, not a Mimi config")
    fixed = {"use_causal_conv": True, "pad_mode": "constant", "use_conv_shortcut": False, "hidden_act": "gelu",
             "attention_bias": False, "num_semantic_quantizers": 1, "trim_right_ratio": 1.0}
    for key, expected in fixed.items():
        if raw.get(key, expected) != expected:
            raise CheckpointError(f"{where}: Mimi with {key} = {raw[key]!r} is not supported (only {expected!r})")
    _check_heads(raw, where)
    dim = _get(raw, "hidden_size", where)
    codeword = raw.get("codebook_dim") or dim
    if raw.get("vector_quantization_hidden_dimension", codeword) != codeword:
        raise CheckpointError(f"{where}: Mimi with codebook_dim != vector_quantization_hidden_dimension "
                              "is not supported")
    if codeword == dim:
        raise CheckpointError(f"{where}: Mimi without quantizer projections (codebook_dim = hidden_size) "
                              "is not supported")
    if raw.get("upsample_groups", dim) != dim:
        raise CheckpointError(f"{where}: Mimi's upsampling must be depthwise (upsample_groups = hidden_size)")
    ratios = list(_get(raw, "upsampling_ratios", where))
    hop = 1
    for ratio in ratios:
        hop *= ratio
    sample_rate = _get(raw, "sampling_rate", where)
    # Older files give the frame rate; transformers otherwise derives it from a stride-2 downsample.
    frame_rate = raw.get("frame_rate") or raw.get("_frame_rate") or sample_rate / (2 * hop)
    return {
        "sample_rate": sample_rate,
        "channels": _get(raw, "audio_channels", where, 1),
        "frame_rate": frame_rate,
        "seanet": {
            "channels": _get(raw, "audio_channels", where, 1), "dimension": dim,
            "n_filters": _get(raw, "num_filters", where), "ratios": ratios,
            "kernel_size": _get(raw, "kernel_size", where), "last_kernel_size": _get(raw, "last_kernel_size", where),
            "residual_kernel_size": _get(raw, "residual_kernel_size", where),
            "n_residual_layers": _get(raw, "num_residual_layers", where),
            "dilation_base": _get(raw, "dilation_growth_rate", where), "compress": _get(raw, "compress", where),
        },
        "quantizer": {"dimension": codeword, "n_q": _get(raw, "num_quantizers", where),
                      "bins": _get(raw, "codebook_size", where), "input_dimension": dim, "output_dimension": dim},
        "transformer": {
            "d_model": dim, "num_heads": raw["num_attention_heads"],
            "num_layers": _get(raw, "num_hidden_layers", where),
            "dim_feedforward": _get(raw, "intermediate_size", where),
            "context": _get(raw, "sliding_window", where), "max_period": _rope_theta(raw, where),
            "layer_scale": raw.get("layer_scale_initial_scale", 0.01),
        },
    }


def _temporal_config(raw: dict, where: str) -> dict:
    """The temporal transformer's keys of our LM config, shared by Moshi and STT."""
    _check_heads(raw, where)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    dim = _get(raw, "hidden_size", where)
    hidden = _get(raw, "ffn_dim", where) // 2  # fc1 holds the gate and the value
    pad = raw.get("pad_token_id")
    return {
        "dim": dim, "num_heads": raw["num_attention_heads"], "num_layers": _get(raw, "num_hidden_layers", where),
        # dim_feedforward = hidden_scale·dim gives back ``hidden`` through the reference's 2·ff // 3
        "hidden_scale": 1.5 * hidden / dim,
        "context": _get(raw, "sliding_window", where), "max_period": _rope_theta(raw, where),
        **({"existing_text_padding_id": pad} if isinstance(pad, int) else {}),
    }


def lm_config(raw: dict, model_type: str, where: str) -> dict:
    """Our LM config (the official config.json's keys) from a transformers Moshi or STT config."""
    config = _temporal_config(raw, where)
    if model_type == STT:
        n_q = _get(raw, "num_codebooks", where)
        return {**config, "text_card": _get(raw, "vocab_size", where) - 1,
                "card": _get(raw, "codebook_vocab_size", where) - 1, "n_q": n_q, "dep_q": 0,
                "delays": [0] * (n_q + 1)}
    depth = _get(raw, "depth_decoder_config", where)
    _check_heads(depth, f"{where} (depth_decoder_config)")
    dep_q = _get(raw, "num_codebooks", where)
    # Not in transformers' config: Moshi's delays, the acoustic codebooks one frame behind (each stream).
    stream = [0] + [1] * (dep_q - 1)
    return {**config, "text_card": _get(raw, "vocab_size", where), "card": _get(raw, "audio_vocab_size", where),
            "n_q": 2 * dep_q, "dep_q": dep_q, "delays": [0] + stream + stream,
            "depformer_dim": _get(depth, "hidden_size", where),
            "depformer_num_heads": depth["num_attention_heads"],
            "depformer_num_layers": _get(depth, "num_hidden_layers", where),
            "depformer_dim_feedforward": 3 * (_get(depth, "ffn_dim", where) // 2) // 2}


def resolve(raw: dict, where: str, find: Callable[[str, bool], Path | None]) -> dict:
    """What ``CheckpointInfo`` holds for a transformers checkpoint, from its config.json.

    ``find(name, optional)`` gives a file of the repo or folder (None if optional and absent).
    A Mimi alone is a codec, not a model to run: it loads where a Mimi checkpoint is named.
    """
    model_type = check_architecture(raw, where)
    if model_type == MIMI:
        raise CheckpointError(f"{where} is a Mimi codec (MimiModel), not a model to talk to or transcribe "
                              "with; a checkpoint's config.json can name it as its Mimi (mimi_name, mimi_config_name)")
    index = find(SHARD_INDEX, True)
    if index is not None:
        for shard in sorted(set(_read_index(index).values())):
            find(shard, False)  # fetched now, beside the index
    weights = index or find(WEIGHTS, False)
    codec_key = "audio_encoder_config" if model_type == MOSHI else "codec_config"
    info = {
        "lm_weights": weights,
        "mimi_weights": weights,
        "tokenizer": find(TOKENIZER, False),
        "lm_config": lm_config(raw, model_type, where),
        "mimi_config": mimi_config(_get(raw, codec_key, where), f"{where} ({codec_key})"),
        "model_type": "moshi" if model_type == MOSHI else "stt",
    }
    if model_type == STT:
        # Kyutai's STT decodes greedily; its delays are the feature extractor's settings.
        info["lm_gen_config"] = {"temp": 0.0, "temp_text": 0.0}
        info["stt_config"] = _stt_config(find(PREPROCESSOR, True))
    return info


def _stt_config(preprocessor: Path | None) -> dict:
    """The text delay and the silence before the audio, as transformers' feature extractor has them
    (0 s each without preprocessor_config.json, its defaults)."""
    try:
        settings = json.loads(preprocessor.read_text()) if preprocessor else {}
        config = {key: float(settings.get(key, 0.0))
                  for key in ("audio_delay_seconds", "audio_silence_prefix_seconds")}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {preprocessor}: {exc}") from None
    if not all(0 <= value <= 60 for value in config.values()):
        raise CheckpointError(f"{preprocessor}: the delays must be from 0 to 60 s, not {config}")
    return config


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the shard index {path}: {exc}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"the shard index {path} has no weight_map")
    return weight_map


# ---------------------------------------------------------------- reading the tensors


def _files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or the shards its index names."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return [path.parent / name for name in sorted(set(_read_index(path).values()))]
    return [path]


def _keys(path: Path) -> set[str]:
    """The tensor names of a checkpoint, read from the headers; none for what is not safetensors."""
    from safetensors import safe_open

    if path.name.endswith(".index.json"):
        return set(_read_index(path))
    try:
        with safe_open(str(path), "pt") as file:
            return set(file.keys())
    except Exception:  # safetensors raises several types; the loader names the problem later
        return set()


def _read(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, prefix removed, memory-mapped from every shard."""
    from ..weights import read_safetensors

    state = {}
    for file in _files(path):
        for key, tensor in read_safetensors(file).items():
            if key.startswith(prefix):
                state[key[len(prefix):]] = tensor
    return state


def is_transformers_mimi(path: Path) -> bool:
    """Whether a Mimi file is in transformers' naming, alone or inside a Moshi or STT checkpoint."""
    keys = _keys(Path(path))
    return any(prefix + _MIMI_KEY in keys for prefix in MIMI_PREFIXES.values())


def _attention(get: Callable[[str], torch.Tensor], prefix: str, heads: int, suffix: str = ".weight"
               ) -> torch.Tensor:
    """The fused ``in_proj_weight`` [q; k; v]. transformers stores the rows of q and k of each head
    as (both halves of the pairs) for rotate-half RoPE; ours are (pair, element) for interleaved
    RoPE. Each is copied once, straight into place."""
    import torch

    q, k, v = (get(f"{prefix}.{name}_proj{suffix}") for name in "qkv")
    rows, cols = q.shape
    fused = torch.empty((3 * rows, cols), dtype=q.dtype)
    for i, weight in enumerate((q, k)):
        fused[i * rows:(i + 1) * rows].view(heads, rows // heads // 2, 2, cols).copy_(
            weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2))
    fused[2 * rows:] = v
    return fused


def _taker(state: dict[str, torch.Tensor], source: str) -> Callable[[str], torch.Tensor]:
    """``state.pop`` that names the file when a tensor is missing."""
    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source} does not fit its config.json: missing tensor {key}")
        return state.pop(key)
    return take


def _leftovers(state: dict[str, torch.Tensor], source: str) -> None:
    if state:
        names = sorted(state)
        raise CheckpointError(f"{source} does not fit its config.json: unexpected tensor(s) "
                              + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else ""))


def mimi_state(path: Path, mimi: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Mimi tensors of a transformers file, in the official layout of the module ``mimi``."""
    path = Path(path)
    expected = set(mimi.state_dict())
    keys = _keys(path)
    prefix = next(p for p in MIMI_PREFIXES.values() if p + _MIMI_KEY in keys)
    state = _read(path, prefix)
    take = _taker(state, str(path))
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.startswith(("encoder.layers.", "decoder.layers."))]:
        part, _, index, rest = key.split(".", 3)
        if rest.startswith("block."):  # block.J.conv.weight
            _, j, _, name = rest.split(".")
            out[f"{part}.model.{index}.block.{j}.conv.conv.{name}"] = take(key)
        else:  # conv.weight: transformers names the transposed convs (upsampling) conv too
            name = f"{part}.model.{index}.conv.conv.{rest.split('.')[-1]}"
            out[name if name in expected else name.replace("conv.conv", "convtr.convtr")] = take(key)
    out["downsample.conv.conv.conv.weight"] = take("downsample.conv.weight")
    out["upsample.convtr.convtr.convtr.weight"] = take("upsample.conv.weight")
    renames = {"mlp.fc1": "linear1", "mlp.fc2": "linear2", "input_layernorm": "norm1",
               "post_attention_layernorm": "norm2", "self_attn_layer_scale": "layer_scale_1",
               "mlp_layer_scale": "layer_scale_2", "self_attn.o_proj": "self_attn.out_proj"}
    for part in ("encoder_transformer", "decoder_transformer"):
        layers = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{part}.layers.")})
        for layer in layers:
            hf = f"{part}.layers.{layer}"
            ours = f"{part}.transformer.layers.{layer}"
            out[f"{ours}.self_attn.in_proj_weight"] = _attention(take, f"{hf}.self_attn",
                                                                 mimi.cfg.transformer.num_heads)
            for key in [k for k in state if k.startswith(hf + ".")]:
                module, _, name = key[len(hf) + 1:].rpartition(".")
                out[f"{ours}.{renames.get(module, module)}.{name}"] = take(key)
    for hf, ours in (("semantic_residual_vector_quantizer", "rvq_first"),
                     ("acoustic_residual_vector_quantizer", "rvq_rest")):
        for proj in ("input_proj", "output_proj"):
            out[f"quantizer.{ours}.{proj}.weight"] = take(f"quantizer.{hf}.{proj}.weight")
        books = sorted({int(k.split(".")[3]) for k in state if k.startswith(f"quantizer.{hf}.layers.")})
        for n in books:
            for hf_name, name in (("embed_sum", "embedding_sum"), ("cluster_usage", "cluster_usage"),
                                  ("initialized", "_initialized")):
                out[f"quantizer.{ours}.vq.layers.{n}._codebook.{name}"] = take(
                    f"quantizer.{hf}.layers.{n}.codebook.{hf_name}")
    _leftovers(state, str(path))
    return out


def _temporal_state(take: Callable[[str], torch.Tensor], model: str, cfg: dict) -> dict[str, torch.Tensor]:
    """The temporal transformer and out_norm, from transformers' ``model`` prefix."""
    out = {}
    dim = cfg["dim"]
    for layer in range(cfg["num_layers"]):
        hf, ours = f"{model}.layers.{layer}", f"transformer.layers.{layer}"
        out[f"{ours}.self_attn.in_proj_weight"] = _attention(take, f"{hf}.self_attn", cfg["num_heads"],
                                                             ".linear.weight")
        out[f"{ours}.self_attn.out_proj.weight"] = take(f"{hf}.self_attn.o_proj.linear.weight")
        out[f"{ours}.gating.linear_in.weight"] = take(f"{hf}.mlp.fc1.weight")
        out[f"{ours}.gating.linear_out.weight"] = take(f"{hf}.mlp.fc2.weight")
        out[f"{ours}.norm1.alpha"] = take(f"{hf}.input_layernorm.weight").view(1, 1, dim)
        out[f"{ours}.norm2.alpha"] = take(f"{hf}.post_attention_layernorm.weight").view(1, 1, dim)
    out["out_norm.alpha"] = take(f"{model}.norm.weight").view(1, 1, dim)
    return out


def lm_state(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The LM tensors of a transformers Moshi or STT file, in the official layout (Mimi left out)."""
    path = Path(path)
    keys = _keys(path)
    stt = _STT_KEY in keys
    state = _read(path, "")
    for prefix in MIMI_PREFIXES.values():
        if prefix:
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    take = _taker(state, str(path))
    if stt:
        out = _temporal_state(take, "model", cfg)
        table = take(_STT_KEY)
        text_rows, audio_rows = cfg["text_card"] + 1, cfg["card"] + 1
        out["text_emb.weight"] = table[:text_rows]
        for k in range(cfg["n_q"]):
            start = text_rows + k * audio_rows
            out[f"emb.{k}.weight"] = table[start:start + audio_rows]
        # The last text logit (text_card itself) is a zero row transformers adds.
        out["text_linear.weight"] = take("lm_head.weight")[:cfg["text_card"]]
    else:
        out = _temporal_state(take, "decoder.model", cfg)
        out["text_emb.weight"] = take("decoder.model.embed_tokens.weight")
        out["text_linear.weight"] = take("decoder.lm_head.weight")
        for k in range(cfg["n_q"]):
            out[f"emb.{k}.weight"] = take(f"embed_tokens.{k}.weight")
        out.update(_depth_state(take, cfg))
    _leftovers(state, str(path))
    return out


def _depth_state(take: Callable[[str], torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """The depth transformer: transformers stacks each per-codebook weight on a first dimension."""
    import torch

    out = {"depformer_text_emb.weight": take("depth_decoder.text_embed_tokens.weight")}
    dep_q, dim = cfg["dep_q"], cfg["depformer_dim"]
    for s in range(dep_q - 1):
        out[f"depformer_emb.{s}.weight"] = take(f"depth_decoder.embed_tokens.{s}.weight")
    for name, stacked in (("depformer_in", "input_projections"), ("linears", "lm_heads")):
        for s, weight in enumerate(take(f"depth_decoder.{stacked}.weight")):
            out[f"{name}.{s}.weight"] = weight
    for layer in range(cfg["depformer_num_layers"]):
        hf, ours = f"depth_decoder.layers.{layer}", f"depformer.layers.{layer}"
        q, k, v, o = (take(f"{hf}.self_attn.{name}_proj.linear.weight") for name in "qkvo")
        fc1, fc2 = take(f"{hf}.mlp.fc1.weight"), take(f"{hf}.mlp.fc2.weight")
        for s in range(dep_q):
            # The depth transformer has no positional encoding: no RoPE permutation here.
            out[f"{ours}.self_attn.in_projs.{s}.weight"] = torch.cat([q[s], k[s], v[s]])
            out[f"{ours}.self_attn.out_projs.{s}.weight"] = o[s]
            out[f"{ours}.gating.{s}.linear_in.weight"] = fc1[s]
            out[f"{ours}.gating.{s}.linear_out.weight"] = fc2[s]
        out[f"{ours}.norm1.alpha"] = take(f"{hf}.input_layernorm.weight").view(1, 1, dim)
        out[f"{ours}.norm2.alpha"] = take(f"{hf}.post_attention_layernorm.weight").view(1, 1, dim)
    return out


# ---------------------------------------------------------------- the LM format, the tokenizer


class TransformersFormat:
    """The LM of a transformers Moshi or STT checkpoint (one file, or shards and their index)."""

    name = "transformers"
    lm_files = (SHARD_INDEX, WEIGHTS)

    def matches(self, path: Path) -> bool:
        keys = _keys(Path(path))
        return _MOSHI_KEY in keys or _STT_KEY in keys

    def load_lm(self, path: Path, lm_config: dict, device: torch.device, dtype: torch.dtype,
                quantize: str | None) -> LMModel:
        from ..moshi.loading import load_lm_state
        from ..moshi.model import LMConfig

        cfg = LMConfig.from_dict(lm_config)
        return load_lm_state(lm_state(path, lm_config), str(path), cfg, device, dtype, quantize)


TRANSFORMERS = TransformersFormat()


class JsonTokenizer:
    """A tokenizer.json (Hugging Face tokenizers) with sentencepiece's method names, as the engine calls them."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise CheckpointError(f"cannot read the text tokenizer {path}: {str(exc).splitlines()[0]}") from None

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def id_to_piece(self, id: int) -> str:
        return self._tokenizer.id_to_token(id)

    def eos_id(self) -> int:
        return self._tokenizer.token_to_id("</s>")
