"""The MLX oracle: run by the MLX venv's Python (mlx + moshi_mlx, not torch), never imported by the tests.

``python mlx_oracle.py FOLDER`` reads FOLDER/pt.safetensors (an official-layout LM), config.json and
tokens.safetensors (``tokens`` int32 [1 + n_q, T]), and writes, with Kyutai's own software:

* model.safetensors, model.q8.safetensors, model.q4.safetensors: the LM imported by moshi_mlx's
  ``load_pytorch_weights`` and saved as Kyutai's exporter does (bf16, then ``nn.quantize`` with
  8 bits in groups of 64 and 4 bits in groups of 32);
* for each file, reloaded as moshi_mlx's local.py does: ``mlx_<variant>.safetensors``, the text
  logits [T, text_card] and teacher-forced depth logits [T, dep_q, card] of a step-by-step run,
  in bf16 as the app runs (``text_bf16``, ``depth_bf16``) and cast to fp32 (``text_fp32``,
  ``depth_fp32``: the file's exact computation), and ``deq_<variant>.safetensors``, the weights as MLX
  dequantizes them (fp32), mapped back to the official layout by the inverse of MLX's importer.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from moshi_mlx import models

VARIANTS = {"bf16": ("model.safetensors", None), "q8": ("model.q8.safetensors", (8, 64)),
            "q4": ("model.q4.safetensors", (4, 32))}


def fresh(cfg, quantized=None):
    model = models.Lm(cfg)
    model.set_dtype(mx.bfloat16)
    if quantized:
        nn.quantize(model, bits=quantized[0], group_size=quantized[1])
    return model


def logits(model, tokens):
    text, depth = [], []
    for t in range(tokens.shape[1]):
        column = tokens[:, t:t + 1]
        xs = None
        for k, emb in enumerate(model.audio_embs):
            xs = emb(column[k + 1][None]) if xs is None else xs + emb(column[k + 1][None])
        xs = xs + model.text_emb(column[0][None])
        out = model.out_norm(model.transformer(xs, cache=model.transformer_cache))
        text.append(model.text_linear(out)[0, 0])
        for cache in model.depformer_cache:
            cache.reset()
        steps = []
        for s, piece in enumerate(model.depformer.slices):
            h = piece.linear_in(out) + piece.emb(column[s][None])
            steps.append(piece.linear_out(piece.transformer(h, cache=model.depformer_cache))[0, 0])
        depth.append(mx.stack(steps))
    return {"text": mx.stack(text), "depth": mx.stack(depth)}


def dequantized(model):
    """Flat MLX-named fp32 weights, each quantized module replaced by mx.dequantize of its codes."""
    flat = dict(tree_flatten(model.parameters()))
    out = {}
    for key, value in flat.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if f"{module}.scales" in flat:
            quantized = model
            for part in module.split("."):
                quantized = quantized[int(part)] if part.isdigit() else getattr(quantized, part)
            value = mx.dequantize(value, flat[f"{module}.scales"], flat[f"{module}.biases"],
                                  quantized.group_size, quantized.bits)
        out[key] = value.astype(mx.float32)
    return out


def to_pytorch(mlx_state, dep_q):
    """The inverse of moshi_mlx's ``load_pytorch_weights`` for a Moshi LM."""
    out, fused = {}, {}
    for key, value in mlx_state.items():
        parts = key.split(".")
        if key == "out_norm.weight":
            out["out_norm.alpha"] = value[None, None]
        elif parts[0] == "audio_embs":
            out[f"emb.{parts[1]}.weight"] = value
        elif parts[0] == "transformer":
            if parts[-2] in ("norm1", "norm2"):
                out[key[:-len("weight")] + "alpha"] = value[None, None]
            else:
                out[key.replace(".in_proj.weight", ".in_proj_weight")] = value
        elif parts[0] == "depformer":
            s, rest = int(parts[2]), ".".join(parts[3:])
            if rest == "linear_in.weight":
                out[f"depformer_in.{s}.weight"] = value
            elif rest == "linear_out.weight":
                out[f"linears.{s}.weight"] = value
            elif rest == "emb.weight":
                out["depformer_text_emb.weight" if s == 0 else f"depformer_emb.{s - 1}.weight"] = value
            else:
                layer, sub = parts[5], ".".join(parts[6:])
                if sub.startswith("norm"):
                    if s == 0:
                        out[f"depformer.layers.{layer}.{sub[:-len('weight')]}alpha"] = value[None, None]
                elif sub.startswith("gating."):
                    out[f"depformer.layers.{layer}.gating.{s}.{sub[len('gating.'):]}"] = value
                else:
                    name = "in_proj_weight" if "in_proj" in sub else "out_proj.weight"
                    fused.setdefault(f"depformer.layers.{layer}.self_attn.{name}", [None] * dep_q)[s] = value
        else:
            out[key] = value
    out.update({key: mx.concatenate(parts) for key, parts in fused.items()})
    return out


def main(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    cfg = models.LmConfig.from_config_dict(config)
    tokens = mx.load(str(folder / "tokens.safetensors"))["tokens"]

    model = fresh(cfg)
    model.load_pytorch_weights(str(folder / "pt.safetensors"), cfg, strict=True)
    model.set_dtype(mx.bfloat16)
    model.save_weights(str(folder / VARIANTS["bf16"][0]))
    for name, (file, quantized) in VARIANTS.items():
        if quantized:  # scripts/quantize_mlx.py: bf16 weights in, nn.quantize, save
            model = fresh(cfg)
            model.load_weights(str(folder / VARIANTS["bf16"][0]), strict=True)
            nn.quantize(model, bits=quantized[0], group_size=quantized[1])
            model.save_weights(str(folder / file))
        outputs = {}
        for dtype in ("bf16", "fp32"):
            model = fresh(cfg, quantized)
            model.load_weights(str(folder / file), strict=True)
            if dtype == "fp32":
                model.set_dtype(mx.float32)  # scales, biases and norms upcast losslessly; codes stay
            for key, value in logits(model, tokens).items():
                outputs[f"{key}_{dtype}"] = value.astype(mx.float32)
        mx.save_safetensors(str(folder / f"mlx_{name}.safetensors"), outputs)
        mx.save_safetensors(str(folder / f"deq_{name}.safetensors"), to_pytorch(dequantized(model), cfg.depformer.num_slices))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
