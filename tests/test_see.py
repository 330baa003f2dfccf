"""`moshi see IMAGE --input` end to end, through the real CLI, the tiny MoshiVis folder and real
JPEG/PNG files. With the gate kept closed it must say exactly what the plain Moshi LM of the same
weights says, stepped as Kyutai's MoshiVis server steps it."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from engine.moshi.model import LMModel
from engine.moshi.runner import ChatRunner
from engine.moshivis.loading import load_moshivis
from engine.moshivis.model import MoshiVisConfig
from engine.moshivis.runner import SAMPLING
from engine.options import ModelOptions
from engine.runner import FirstFrame, load_models

@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    image = Image.new("RGB", (640, 480), (30, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([200, 100, 440, 340], fill=(250, 210, 40))
    draw.rectangle([0, 380, 640, 480], fill=(40, 160, 60))
    paths = {"jpeg": folder / "sun.jpg", "png": folder / "sun.png"}
    image.save(paths["jpeg"], quality=90)
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["png"])
    return paths


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """3 s at 24 kHz of vowel-like bursts, so that the codes vary."""
    t = np.arange(3 * 24000) / 24000
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / 24000) / k for k in range(1, 8))
    pcm = (0.3 * voice * (np.sin(2 * np.pi * 1.3 * t) > -0.2) / 2.6).astype(np.float32)
    path = tmp_path_factory.mktemp("input") / "speech.wav"
    soundfile.write(path, pcm, 24000, subtype="FLOAT")
    return path, len(pcm)


def _moshi(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "moshi_tui", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_headless_see_end_to_end(vis_folders, pictures, speech, tmp_path, kind):
    path, samples = speech
    result = _moshi("see", pictures[kind], "--hf-repo", vis_folders["vis"], "--input", path, "--output",
                    tmp_path / "reply.wav", "--transcript", tmp_path / "words.txt", "--xa-start", 4)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 5
    assert (tmp_path / "words.txt").read_text() == result.stdout.strip("\n")
    reply, rate = soundfile.read(tmp_path / "reply.wav", dtype="float32")
    assert rate == 24000 and reply.shape == (samples // 1920 * 1920,), "one frame out per frame in"
    assert np.abs(reply).max() > 1e-3


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_headless_see_quantized(vis_folders, pictures, speech, tmp_path, mode):
    path, samples = speech
    result = _moshi("see", pictures["jpeg"], "--hf-repo", vis_folders["vis"], "--input", path, "--output",
                    tmp_path / "reply.wav", "--xa-start", 4, "--quantize", mode)
    assert result.returncode == 0, result.stderr
    assert f"loading the language model ({mode})" in result.stderr
    assert len(result.stdout.strip()) > 5
    reply, rate = soundfile.read(tmp_path / "reply.wav", dtype="float32")
    assert rate == 24000 and reply.shape == (samples // 1920 * 1920,)
    assert np.abs(reply).max() > 1e-3


@pytest.mark.parametrize("option", ["--output", "--transcript"])
def test_reply_files_need_input(vis_folders, pictures, tmp_path, option):
    result = _moshi("see", pictures["jpeg"], "--hf-repo", vis_folders["vis"], option, tmp_path / "reply")
    assert result.returncode == 2
    assert "goes with --input" in result.stderr and option in result.stderr
    assert not (tmp_path / "reply").exists()


def test_gate_closed_says_what_the_plain_lm_says(vis_folders, pictures, speech, tmp_path):
    """With the gate kept closed, `moshi see --input` says what the plain Moshi LM of the same
    weights and depth-transformer norms says, stepped as Kyutai's MoshiVis server steps it.
    Sampled: the random draws must line up too."""
    path, _ = speech
    seen = _moshi("see", pictures["jpeg"], "--hf-repo", vis_folders["vis"], "--input", path, "--output",
                  tmp_path / "see.wav", "--xa-start", 100000, "--temp", 0.8, "--temp-text", 0.7, "--seed", 11)
    assert seen.returncode == 0, seen.stderr

    def plain_lm(info, device, dtype, quantize):
        vis = load_moshivis(info.lm_weights, MoshiVisConfig.from_checkpoint(info), device=device, dtype=dtype)
        lm = LMModel(replace(vis.lm.cfg, cross_attention=False)).to(dtype)
        lm.load_state_dict({k: v for k, v in vis.lm.state_dict().items() if "cross" not in k})
        return lm.eval()

    options = ModelOptions(hf_repo=str(vis_folders["vis"]), temp=0.8, temp_text=0.7, seed=11)
    runner = ChatRunner(load_models(options, "", None, plain_lm, SAMPLING), FirstFrame.KYUTEYE_SERVER)
    pcm, _ = soundfile.read(path, dtype="float32")
    outs = [runner.step(pcm[start:start + 1920]) for start in range(0, len(pcm) - 1919, 1920)]
    assert len(seen.stdout.strip()) > 5 and seen.stdout == "".join(out.text or "" for out in outs) + "\n"
    reply, _ = soundfile.read(tmp_path / "see.wav", dtype="int16")
    expected = np.concatenate([np.zeros(1920, np.float32) if out.pcm is None else out.pcm for out in outs])
    np.testing.assert_array_equal(reply, (np.clip(expected, -1, 1) * 32767).round())


@pytest.mark.parametrize("case", ["missing", "not a picture", "plain model"])
def test_one_line_errors(vis_folders, pictures, speech, tmp_path, case):
    path, _ = speech
    picture, model = pictures["png"], vis_folders["vis"]
    if case == "missing":
        picture = tmp_path / "nowhere.jpg"
    elif case == "not a picture":
        picture = tmp_path / "notes.jpg"
        picture.write_text("shopping list: eggs, milk")
    else:
        model = vis_folders["chat"]
    result = _moshi("see", picture, "--hf-repo", model, "--input", path)
    assert result.returncode == (1 if case == "plain model" else 2)  # 2: a bad argument
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("moshi: error:"), result.stderr
    expected = {"missing": "nowhere.jpg", "not a picture": "notes.jpg", "plain model": "not a MoshiVis model"}[case]
    assert expected in lines[-1]
    if case != "plain model":
        assert len(lines) == 1, "the picture is checked before anything is loaded"
