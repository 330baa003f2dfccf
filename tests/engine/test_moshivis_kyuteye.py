"""MoshiVis against Kyutai's PyTorch MoshiVis code (kyuteye_pt), the code that trained the released
weights: what it computed on the tiny MoshiVis checkpoint from a picture and the user's Mimi codes is
kept in golden/moshivis_kyuteye.safetensors (made by scripts/kyuteye_golden.py, which says how), and
ours must compute the same from the same inputs, greedy and in float32.
"""

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from engine.hub import CheckpointInfo
from engine.moshi.generate import LMGen, Sampling
from engine.moshivis.loading import load_moshivis
from engine.moshivis.model import MoshiVisConfig
from engine.moshivis.tiny import write_tiny_moshivis_checkpoint
from engine.moshivis.vision import image_pixels
from engine.transformer import RMSNorm

GOLDEN = Path(__file__).parent / "golden" / "moshivis_kyuteye.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, golden):
    _, metadata = golden
    folder = write_tiny_moshivis_checkpoint(tmp_path_factory.mktemp("vis"), seed=int(metadata["checkpoint_seed"]))
    checksum = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert checksum == metadata["checkpoint_sha256"], (
        "the tiny MoshiVis checkpoint is no longer the one kyuteye ran: regenerate the golden file "
        "with scripts/kyuteye_golden.py")
    return folder


def _load(folder):
    cfg = MoshiVisConfig.from_checkpoint(CheckpointInfo.resolve(folder))
    return load_moshivis(folder / "model.safetensors", cfg, dtype=torch.float32)


def _picture(golden):
    tensors, _ = golden
    return Image.fromarray(tensors["picture"].numpy())


def _generate(model, golden, source):
    """Text tokens [steps], audio tokens [steps, 8] (−1 while held back) and gates [steps], one greedy
    LM step per frame of the golden user codes, looking at ``source`` from xa_start on."""
    tensors, metadata = golden
    gen = LMGen(model.lm, Sampling.greedy(), xa_start=int(metadata["xa_start"]))
    text, audio, gates = [], [], []
    with gen.streaming(1):
        gen.set_cross_source(source)
        for codes in tensors["codes"]:
            out = gen.step_full(codes.view(1, 8, 1))
            text.append(-1 if out.tokens is None else int(out.tokens[0, 0, 0]))
            audio.append([-1] * 8 if out.tokens is None else out.tokens[0, 1:, 0].tolist())
            gates.append(float(out.gate[0]))
    return torch.tensor(text), torch.tensor(audio), torch.tensor(gates)


def test_pixels_are_kyuteyes(folder, golden):
    tensors, _ = golden
    size = MoshiVisConfig.from_checkpoint(CheckpointInfo.resolve(folder)).vision.image_size
    assert torch.equal(image_pixels(_picture(golden), size), tensors["pixels"])


def test_image_tokens_are_kyuteyes(folder, golden):
    tensors, _ = golden
    torch.testing.assert_close(_load(folder).embed_image(_picture(golden)), tensors["image_tokens"],
                               rtol=0, atol=1e-5)


def test_greedy_tokens_and_gates_are_kyuteyes(folder, golden):
    tensors, _ = golden
    model = _load(folder)
    text, audio, gates = _generate(model, golden, model.embed_image(_picture(golden)))
    assert text.tolist() == tensors["text"].tolist()
    assert audio.tolist() == tensors["audio"].tolist()
    torch.testing.assert_close(gates, tensors["gate"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", ["no picture", "other codes", "temporal norms", "depth norms", "norm_xa"])
def test_each_difference_changes_the_tokens(folder, golden, change):
    """The comparison above proves something: on this checkpoint, the picture, the user's codes and
    each of the three norm choices change both the text and the audio tokens within the 40 steps."""
    tensors, _ = golden
    model = _load(folder)
    flipped = {"temporal norms": "lm.transformer.", "depth norms": "lm.depformer.", "norm_xa": "image_prefix."}
    for name, module in model.named_modules():
        if change in flipped and isinstance(module, RMSNorm) and name.startswith(flipped[change]):
            module.variance = not module.variance
    source = None if change == "no picture" else model.embed_image(_picture(golden))
    if change == "other codes":
        tensors = {**tensors, "codes": torch.roll(tensors["codes"], 1, dims=0)}
    text, audio, _ = _generate(model, (tensors, golden[1]), source)
    assert text.tolist() != tensors["text"].tolist() and audio.tolist() != tensors["audio"].tolist()
