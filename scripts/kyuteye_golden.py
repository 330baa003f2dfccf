"""Write tests/engine/golden/moshivis_kyuteye.safetensors: what Kyutai's PyTorch MoshiVis code
(kyuteye_pt) computes on the tiny MoshiVis checkpoint, which tests/engine/test_moshivis_kyuteye.py
compares ours with.

kyuteye_pt is not a package on the index and pins old versions of its dependencies, so it runs in
an environment of its own, never this project's. The file in the repository was made on Linux
x86_64 (CPU only) with Python 3.11.7, from kyutai-labs/moshivis on GitHub at commit
8624f4e01d4b10537221a4611b17c711bab8350a, with torch 2.14.1, torchvision 0.29.1, transformers
4.47.0 and moshi 0.1.0 (installed without its dependencies, which pin older torch, numpy and
safetensors: kyuteye uses it only for ``sample_token``):

    git clone https://github.com/kyutai-labs/moshivis /tmp/moshivis
    git -C /tmp/moshivis checkout 8624f4e01d4b10537221a4611b17c711bab8350a
    python3.11 -m venv /tmp/kyuteye-env
    /tmp/kyuteye-env/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.47.0 \\
        einops sentencepiece safetensors pyyaml fire rich pillow numpy
    /tmp/kyuteye-env/bin/pip install --no-deps moshi==0.1.0
    /tmp/kyuteye-env/bin/python scripts/kyuteye_golden.py /tmp/moshivis/kyuteye_pt

(torchvision must load its compiled operators: a CPU-only torch wheel with a CUDA torchvision
wheel does not import, hence the matching pair above.)

What kyuteye computes, in float32, as its server does it (``kyuteye/server.py``) but without Mimi:

- the picture: an 8-bit RGB array resized by ``get_minimal_transforms`` (torchvision's v2
  bicubic resize on the uint8 tensor) and normalised by ``to_tensor_and_normalize``: ``pixels``;
- ``ImageProjection`` on those pixels (the SigLIP tower built at the tiny size, since kyuteye
  only builds So400m): ``image_tokens``;
- ``MoshiVisGen`` greedy (``use_sampling=False``), one ``step`` per frame of given user ``codes``,
  with the picture's keys and values as ``ca_src`` from offset ``xa_start`` on: the ``text`` and
  ``audio`` tokens of each step (−1 while the acoustic delay holds them back) and its ``gate``.

Its MoshiVis is built with the LM settings of ``configs/moshika-vis.yaml`` at the tiny
checkpoint's sizes (read from its config.json) and loaded from its model.safetensors, which is in
the official layout; the file's metadata keeps the checkpoint's SHA-256, which the test checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "tests" / "engine" / "golden" / "moshivis_kyuteye.safetensors"
SEED = 3  # of the tiny checkpoint
XA_START = 4
STEPS = 40


def picture() -> np.ndarray:
    """48×72 RGB: gradients, a bright block and noise, smaller than the tiny tower's 56 px on one
    side and larger on the other, so the resize both enlarges and reduces."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:72]
    rgb = np.stack([255 * x / 71, 255 * y / 47, 127 + 120 * np.sin(x / 5 + y / 7)], axis=-1)
    rgb[10:25, 20:40] = (250, 230, 20)
    return np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)


def user_codes(card: int) -> torch.Tensor:
    """[STEPS, 8] random Mimi codes of the user's stream."""
    return torch.randint(0, card, (STEPS, 8), generator=torch.Generator().manual_seed(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kyuteye_pt", type=Path, help="the kyuteye_pt folder of a moshivis checkout")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(args.kyuteye_pt.resolve())]

    from safetensors.torch import load_file, save_file

    from engine.moshivis.tiny import write_tiny_moshivis_checkpoint

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_moshivis_checkpoint(Path(tmp) / "vis", seed=SEED)
        config = json.loads((folder / "config.json").read_text())
        weights = folder / "model.safetensors"
        checksum = hashlib.sha256(weights.read_bytes()).hexdigest()
        state = load_file(weights)

    vision = config["moshivis"]["vision"]
    image = torch.from_numpy(picture()).permute(2, 0, 1)
    projection = _image_projection(args.kyuteye_pt, vision, config["dim"], state)
    pixels = projection.to_tensor_and_normalize(_resize(image, vision["image_size"]))[None]
    image_tokens = projection(pixels)["cross_attention_src"]

    gen = _moshivis_gen(args.kyuteye_pt, config, state)
    codes = user_codes(config["card"])
    k, v = gen.precompte_ca_kv(image_tokens)
    text, audio, gate = [], [], []
    gen.streaming_forever(1)
    for t in range(STEPS):
        looks = gen.get_streaming_attribute("offset", 0) >= XA_START
        tokens, gate_mean = gen.step(codes[t].view(1, 8, 1), ca_src=(k, v) if looks else None)
        text.append(-1 if tokens is None else int(tokens[0, 0, 0]))
        audio.append([-1] * 8 if tokens is None else tokens[0, 1:, 0].tolist())
        gate.append(gate_mean)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({"picture": torch.from_numpy(picture()), "pixels": pixels.contiguous(),
               "image_tokens": image_tokens.contiguous(), "codes": codes, "text": torch.tensor(text),
               "audio": torch.tensor(audio), "gate": torch.tensor(gate, dtype=torch.float32)},
              args.output, metadata={"checkpoint_seed": str(SEED), "checkpoint_sha256": checksum,
                                     "xa_start": str(XA_START), **_provenance(args.kyuteye_pt)})
    print(f"wrote {args.output}: {sum(t >= 0 for t in text)} steps of tokens, text {text}")


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    from kyuteye.modules.image_transforms import get_minimal_transforms

    return get_minimal_transforms(size)(image)


def _image_projection(kyuteye_pt: Path, vision: dict, dim: int, state: dict):
    """kyuteye's ImageProjection with a SigLIP tower of the tiny checkpoint's size, loaded from it."""
    import kyuteye.models.image_projection as image_projection
    from kyuteye.config.kyuteye_config import KyuteyeConfig
    from kyuteye.modules.image_encoder import TrimmedFlexiViTWrapper
    from transformers import SiglipVisionConfig, SiglipVisionModel

    def tiny_siglip(encoder, pretrained):
        siglip = SiglipVisionConfig(hidden_size=vision["hidden"], intermediate_size=vision["mlp_hidden"],
                                    num_attention_heads=vision["num_heads"], num_hidden_layers=vision["num_layers"],
                                    image_size=vision["image_size"], patch_size=vision["patch"],
                                    layer_norm_eps=vision["eps"], vision_use_head=False)
        return TrimmedFlexiViTWrapper(SiglipVisionModel(siglip).vision_model, interpolate_pos_encoding=True)

    class TinyImageProjection(image_projection.ImageProjection):
        encoder_out_dim = vision["hidden"]

    image_projection.load_image_encoder = tiny_siglip
    kyuteye_config = KyuteyeConfig.from_yml(kyuteye_pt / "configs" / "moshika-vis.yaml")
    prefix = "image_prefix."
    weights = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    projection = TinyImageProjection.from_config(kyuteye_config, dim, weights)
    return projection.float().eval()


def _moshivis_gen(kyuteye_pt: Path, config: dict, state: dict):
    """kyuteye's MoshiVisGen, greedy, with the yaml's settings at the tiny sizes, loaded as
    ``MoshiVisGen.from_config`` loads (the shared cross-attention stored under layer 0 only)."""
    from kyuteye.config.kyuteye_config import KyuteyeConfig
    from kyuteye.models.moshivis import MoshiVis, MoshiVisGen

    kwargs = KyuteyeConfig.from_yml(kyuteye_pt / "configs" / "moshika-vis.yaml").moshi_constructor_kwargs
    kwargs.update(dim=config["dim"], num_heads=config["num_heads"], num_layers=config["num_layers"],
                  hidden_scale=config["hidden_scale"], context=config["context"], max_period=config["max_period"],
                  text_card=config["text_card"], audio_card=config["card"], n_q=config["n_q"], dep_q=config["dep_q"],
                  delays=list(config["delays"]), padding_token_id=config["existing_text_padding_id"],
                  depformer_dim=config["depformer_dim"], depformer_num_heads=config["depformer_num_heads"],
                  depformer_num_layers=config["depformer_num_layers"],
                  depformer_dim_feedforward=config["depformer_dim_feedforward"],
                  depformer_context=config["depformer_context"])
    model = MoshiVis(**kwargs, dtype=torch.float32)
    weights = {k: v.float() for k, v in state.items() if not k.startswith("image_prefix.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "cross_attention.mha" not in k or ".layers.0." in k]
    if missing or unexpected:
        raise SystemExit(f"kyuteye's MoshiVis does not fit the checkpoint: missing {missing}, unexpected {unexpected}")
    return MoshiVisGen(model.eval(), use_sampling=False)


def _provenance(kyuteye_pt: Path) -> dict[str, str]:
    """The kyuteye commit and the versions of what ran it."""
    import moshi
    import torchvision
    import transformers

    commit = subprocess.run(["git", "-C", str(kyuteye_pt), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"kyuteye": commit.stdout.strip() or "unknown", "torch": torch.__version__,
            "torchvision": torchvision.__version__, "transformers": transformers.__version__,
            "moshi": moshi.__version__}


if __name__ == "__main__":
    main()
