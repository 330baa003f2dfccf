"""Issue 13 through the real CLI and the tiny checkpoints: no output is written through a symlink,
no input is overwritten, one bad file does not end a batch, and bad arguments, files and settings are
one-line errors before the model loads."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from engine.tiny import write_tiny_checkpoint
from transcribe_support import ENV, moshi, moshi_command, noise

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_checkpoint(root / kind, kind, seed=0) for kind in ("chat", "transcribe")}


@pytest.fixture
def talk(tmp_path):
    path = tmp_path / "talk.wav"
    soundfile.write(path, noise(1.0, 24000, seed=1), 24000, subtype="PCM_16")
    return path


def _victim(path):
    path.write_text("keep me")
    return path


def _one_line_error(result, *words):
    """The last line of stderr, a `moshi: error:` line naming `words`, written before any model loads."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines, result
    assert "moshi: loading" not in result.stderr, result.stderr
    assert lines[-1].startswith("moshi: error:") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[-1], result.stderr
    return lines[-1]


# -- no output is written through a symlink -----------------------------------------------------

def test_transcript_files_replace_a_symlink_at_their_name(tiny, talk, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = _victim(tmp_path / "victim.txt")
    for extension in ("txt", "srt", "vtt", "jsonl", "json"):
        (out / f"talk.{extension}").symlink_to(victim)
    result = moshi("transcribe", "--model", tiny["transcribe"], talk, "-f", "all", "-o", out)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == [f"talk.{e}" for e in ("json", "jsonl", "srt", "txt", "vtt")]
    assert not any(p.is_symlink() for p in out.iterdir())


def test_chat_output_and_transcript_replace_a_symlink_at_their_name(tiny, talk, tmp_path):
    wav_victim, txt_victim = _victim(tmp_path / "a.txt"), _victim(tmp_path / "b.txt")
    (tmp_path / "moshi.wav").symlink_to(wav_victim)
    (tmp_path / "moshi.txt").symlink_to(txt_victim)
    result = moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "-o", tmp_path / "moshi.wav",
                   "--transcript", tmp_path / "moshi.txt")
    assert result.returncode == 0, result.stderr
    assert wav_victim.read_text() == "keep me" and txt_victim.read_text() == "keep me"
    assert soundfile.info(tmp_path / "moshi.wav").samplerate == 24000
    assert not (tmp_path / "moshi.wav").is_symlink() and not (tmp_path / "moshi.txt").is_symlink()


# -- no input is overwritten --------------------------------------------------------------------

def test_tiny_model_refuses_a_folder_with_files_unless_forced(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"mine")
    _one_line_error(moshi("tiny-model", folder), "--force")
    assert (folder / "model.safetensors").read_bytes() == b"mine"
    assert moshi("tiny-model", folder, "--force").returncode == 0
    assert (folder / "model.safetensors").read_bytes() != b"mine"


def test_chat_refuses_to_write_over_its_input(tiny, talk):
    before = talk.read_bytes()
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "-o", talk), "--output")
    assert talk.read_bytes() == before
    hard_link = talk.with_name("same.wav")
    os.link(talk, hard_link)
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "--transcript", hard_link), "--transcript")
    assert talk.read_bytes() == before


def test_transcribe_refuses_to_write_over_an_input(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    talk = folder / "talk.txt"  # any name: the format is read from the content
    soundfile.write(talk, noise(1.0, 24000), 24000, format="WAV", subtype="PCM_16")
    before = talk.read_bytes()
    _one_line_error(moshi("transcribe", "--model", tiny["transcribe"], talk, "-f", "txt", "-o", folder), str(talk))
    assert talk.read_bytes() == before


# -- one bad file does not end a batch -------------------------------------------------------

def test_a_file_that_fails_to_decode_is_reported_and_the_batch_goes_on(tiny, tmp_path):
    good = tmp_path / "b_good.flac"
    soundfile.write(good, noise(3.0, 48000, seed=2), 48000)
    data = bytearray(good.read_bytes())
    for i in range(2000, len(data), 7):  # the header stays valid: the damage shows while decoding
        data[i] ^= 0x5A
    bad = tmp_path / "a_corrupt.flac"
    bad.write_bytes(bytes(data))
    out = tmp_path / "o"
    result = moshi("transcribe", "--model", tiny["transcribe"], bad, good, "-f", "json", "-o", out,
                   "--batch-size", 1)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("moshi: error:")]
    assert len(errors) == 2 and "a_corrupt.flac" in errors[0] and "going on" in errors[0], result.stderr
    assert "1 of 2" in errors[1] and "a_corrupt.flac" in errors[1] and "b_good" not in errors[1]
    assert "Traceback" not in result.stderr
    assert json.loads((out / "b_good.json").read_text())["complete"] is True
    assert json.loads((out / "a_corrupt.json").read_text())["complete"] is False


# -- bad arguments, files and settings: one line, before the model loads ---------------------

def test_outputs_into_a_missing_folder_are_refused_before_loading(tiny, talk, tmp_path):
    wav = tmp_path / "moshi.wav"
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "-o", wav,
                          "--transcript", tmp_path / "nowhere" / "x.txt"), "--transcript", "does not exist")
    assert not wav.exists()
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "-o", tmp_path / "nowhere" / "m.wav"),
                    "--output")


def test_a_record_folder_that_cannot_be_made_is_one_line(tiny, tmp_path):
    a_file = _victim(tmp_path / "file")
    result = moshi("chat", "--no-tui", "--hf-repo", tiny["chat"], "--record", a_file)
    _one_line_error(result, str(a_file))
    assert a_file.read_text() == "keep me"


def test_tiny_model_refuses_a_file_and_a_dangling_link(tmp_path):
    a_file = _victim(tmp_path / "file")
    _one_line_error(moshi("tiny-model", a_file), "is a file")
    (tmp_path / "link").symlink_to(tmp_path / "nothing")
    _one_line_error(moshi("tiny-model", tmp_path / "link"), "symlink to nothing")
    assert a_file.read_text() == "keep me" and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("key, value", [("dim", "sixty-four"), ("delays", "0,1"), ("context", 1e9),
                                        ("num_layers", 10**6), ("dim", True)])
def test_a_config_json_of_wrong_types_or_sizes_is_one_line(tiny, talk, tmp_path, key, value):
    folder = tmp_path / "model"
    shutil.copytree(tiny["chat"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    _one_line_error(moshi("chat", "--hf-repo", folder, "-i", talk), f"config.json: {key} must be")


def test_a_corrupt_tokenizer_is_one_line(tiny, talk, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny["chat"], folder)
    (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 8)
    _one_line_error(moshi("chat", "--hf-repo", folder, "-i", talk), "tokenizer")


def test_a_config_json_naming_a_file_outside_its_folder_is_refused(tiny, talk, tmp_path):
    folder = tmp_path / "a" / "b" / "model"
    shutil.copytree(tiny["chat"], folder)
    config = json.loads((folder / "config.json").read_text())
    for name in ("../../../../../../../../etc/passwd", "file:///etc/passwd"):
        (folder / "config.json").write_text(json.dumps({**config, "tokenizer_name": name}))
        _one_line_error(moshi("chat", "--hf-repo", folder, "-i", talk), "tokenizer_name", "in its folder")


@pytest.mark.parametrize("seed", ["1e23", str(10**23), "-1"])
def test_a_seed_out_of_range_is_a_usage_error(tiny, talk, seed):
    result = moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, "--seed", seed)
    assert result.returncode == 2 and "--seed" in result.stderr and "Traceback" not in result.stderr


def test_a_config_file_that_is_not_utf8_is_one_line(tiny, talk, tmp_path):
    config = tmp_path / "config.toml"
    config.write_bytes(b'voice = "\xff\xfe"\n')
    result = subprocess.run(moshi_command("chat", "--hf-repo", tiny["chat"], "-i", talk), capture_output=True,
                            text=True, env={**ENV, "MOSHI_CONFIG": str(config)}, timeout=120)
    _one_line_error(result, str(config), "UTF-8")


@pytest.mark.parametrize("flag, value", [("--temp", "nan"), ("--temp", "-1"), ("--temp-text", "inf"),
                                         ("--top-k", "-5"), ("--top-k-text", "-1")])
def test_sampling_values_out_of_range_are_refused(tiny, talk, flag, value):
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", talk, flag, value), flag)


def test_nothing_is_left_in_tmpdir(tiny, talk, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**ENV, "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    result = subprocess.run(moshi_command("chat", "--hf-repo", tiny["chat"], "-i", talk), capture_output=True,
                            text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    assert list(tmpdir.iterdir()) == []


def test_a_huge_picture_is_one_line_before_loading(tiny, talk, tmp_path):
    from tui.test_see_app import huge_png

    picture = tmp_path / "huge.png"
    picture.write_bytes(huge_png())
    for extra in (["-i", talk], ["--no-tui"]):
        _one_line_error(moshi("see", picture, "--hf-repo", tiny["chat"], *extra), "too large", "12000×12000")


def test_a_recording_of_an_absurd_rate_is_one_line_before_loading(tiny, tmp_path):
    path = tmp_path / "8hz.wav"
    soundfile.write(path, np.zeros(1000, np.int16), 8, subtype="PCM_16")
    _one_line_error(moshi("chat", "--hf-repo", tiny["chat"], "-i", path), "8 Hz")
