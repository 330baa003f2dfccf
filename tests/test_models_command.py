"""`moshi models` on a Hugging Face cache laid out as huggingface_hub lays it out (blobs, snapshots
linking to them, refs), in a temporary folder named by HF_HUB_CACHE."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage


def _moshi(tmp_path, *args, input=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "moshi_tui", "models", *args], env=env, input=input,
                          capture_output=True, text=True, timeout=60)


def test_lists_every_name_and_the_size_of_the_cached_ones(tmp_path):
    cache_repo(tmp_path / "hub", "kyutai/stt-1b-en_fr", {"config.json": b"{}", "model.safetensors": b"x" * 3000})
    cache_repo(tmp_path / "hub", "someone/other", {"config.json": b"{}"})
    result = _moshi(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Hugging Face cache: {tmp_path / 'hub'}"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    other_formats = [f"{voice}-{fmt}" for voice in ("moshika", "moshiko")
                     for fmt in ("candle-q8", "candle-bf16", "mlx-q4", "mlx-q8", "mlx-bf16")]
    assert list(rows) == ["moshika", "moshiko", "moshika-q8", "moshiko-q8", "moshika-vis", "stt-1b-en_fr",
                          "stt-1b-en_fr-vad", "stt-2.6b-en", *other_formats]
    assert rows["moshiko-candle-q8"] == ["not", "cached", "kyutai/moshiko-candle-q8"]
    assert rows["stt-1b-en_fr"] == ["3.0K", "kyutai/stt-1b-en_fr"]
    assert rows["moshika"] == ["not", "cached", "kyutai/moshika-pytorch-bf16"]
    assert lines[-1] == "Other cached repos: someone/other (2.0)"


def test_delete_removes_one_model_after_asking(tmp_path):
    kept = cache_repo(tmp_path / "hub", "kyutai/moshika-pytorch-bf16", {"config.json": b"{}"})
    gone = cache_repo(tmp_path / "hub", "kyutai/stt-2.6b-en", {"config.json": b"{}", "model.safetensors": b"y" * 10})
    refused = _moshi(tmp_path, "--delete", "stt-2.6b-en", input="n\n")
    assert refused.returncode == 1 and gone.exists()
    result = _moshi(tmp_path, "--delete", "stt-2.6b-en", "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Deleted kyutai/stt-2.6b-en: 12.0 freed\n"
    assert not gone.exists() and kept.exists()
    missing = _moshi(tmp_path, "--delete", "stt-2.6b-en", "--yes")
    assert missing.returncode == 1
    assert missing.stderr == ("moshi: error: kyutai/stt-2.6b-en is not in the Hugging Face cache; "
                              "`moshi models` lists what is\n")
