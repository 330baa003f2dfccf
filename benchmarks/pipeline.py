"""`moshi transcribe` on a 60 s file: its real-time factor, and the reference's on the same audio.

The product path as a user runs it: ``moshi transcribe FILE --quantize int8|int4 --stats`` in a
subprocess, on a checkpoint folder at STT-1B's shapes (random weights, Mimi with 32 codebooks), one
torch thread per process. By default Mimi encodes in a process of its own, on the second core,
while the LM steps; ``*_one_process`` sets ``MOSHI_NO_PIPELINE=1``, which runs both stages in one
process, one after the other. The reference (bf16 LM, Mimi then the LM each frame, as its
``moshi-inference`` runs) is timed in this process on the first 10 s of the same audio: its cost
per frame does not depend on the position, since it always attends over its whole KV ring.

    python benchmarks/pipeline.py            # 60 s of audio
    python benchmarks/pipeline.py --quick    # 2 s and a 2-layer LM: checks that the code runs
    python benchmarks/pipeline.py --json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sentencepiece  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from common import run_command_line  # noqa: E402
from lm import write_random_weights  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.mimi.model import MimiConfig  # noqa: E402
from engine.mimi.tiny import random_mimi_state  # noqa: E402
from engine.moshi.model import LMConfig  # noqa: E402
from engine.tiny import write_tiny_checkpoint  # noqa: E402

FRAME = 1920
RATE = 24_000


def speechlike(seconds: float) -> torch.Tensor:
    """Harmonic bursts with pauses plus a little noise, [samples]."""
    t = torch.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / RATE
    voice = sum(torch.sin(k * phase) / k for k in range(1, 8)) * (torch.sin(2 * math.pi * 1.3 * t) > -0.2)
    noise = 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return (0.1 * voice + noise).float()


def write_checkpoint(folder: Path, cfg: LMConfig) -> Path:
    """A folder ``moshi transcribe --model`` reads: the tiny STT checkpoint's tokenizer and
    stt_config, with the LM and Mimi at full size."""
    write_tiny_checkpoint(folder, "transcribe")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    write_random_weights(folder / "model.safetensors", cfg, text_vocab=vocab)
    save_file(random_mimi_state(MimiConfig.official(), seed=0), folder / "mimi.safetensors")
    (folder / "mimi_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["mimi_config_name"]
    (folder / "config.json").write_text(json.dumps({**config, **cfg.to_dict()}))
    return folder


def reference_rtf(folder: Path, cfg: LMConfig, wav: torch.Tensor) -> float:
    from moshi.models.lm import LMGen
    from moshi.models.loaders import get_mimi, get_moshi_lm

    mimi = get_mimi(str(folder / "mimi.safetensors"), num_codebooks=32)
    gen = LMGen(get_moshi_lm(str(folder / "model.safetensors"), cfg.to_dict(), device="cpu", dtype=torch.bfloat16),
                use_sampling=False)
    start = time.perf_counter()
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for i in range(len(wav) // FRAME):
            gen.step(mimi.encode(wav[i * FRAME:(i + 1) * FRAME].view(1, 1, -1)))
    return (time.perf_counter() - start) / (len(wav) / RATE)


def cli_rtf(folder: Path, audio: Path, quantize: str | None, pipelined: bool, device: str = "cpu") -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MOSHI_NO_PIPELINE="0" if pipelined else "1")
    options = ["--device", device] + (["--quantize", quantize] if quantize else [])
    result = subprocess.run([sys.executable, "-m", "moshi_tui", "transcribe", "--model", str(folder), str(audio),
                             *options, "--stats"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    found = re.search(r"real-time factor ([0-9.]+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"moshi transcribe failed ({result.returncode}): {result.stderr[-2000:]}")
    return float(found.group(1))


def run(quick: bool) -> dict[str, dict[str, float]]:
    seconds, reference_seconds = (2.0, 1.0) if quick else (60.0, 10.0)
    cfg = LMConfig.stt_1b()
    if quick:
        cfg = dataclasses.replace(cfg, num_layers=2)
    wav = speechlike(seconds)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="moshi-pipeline-") as root:
        folder = write_checkpoint(Path(root) / "stt", cfg)
        audio = Path(root) / "talk.wav"
        soundfile.write(audio, wav.numpy(), RATE, subtype="FLOAT")
        reference = reference_rtf(folder, cfg, wav[:int(reference_seconds * RATE)])

        def figure(rtf: float) -> dict[str, float]:
            return {"ours_rtf": round(rtf, 3), "reference_rtf": round(reference, 3), "ratio": round(rtf / reference, 3)}

        for mode in ("int8", "int4"):
            figures[f"transcribe_rtf_{int(seconds)}s_{mode}"] = figure(cli_rtf(folder, audio, mode, pipelined=True))
        figures[f"transcribe_rtf_{int(seconds)}s_int8_one_process"] = figure(
            cli_rtf(folder, audio, "int8", pipelined=False))
    return figures


# What the table's reference column is, under it.
NOTE = ("reference: the reference's bf16 LM and Mimi in one process")


def main() -> None:
    run_command_line(__doc__, "2 s, small LM: only checks that the code runs", run, NOTE)


if __name__ == "__main__":
    main()
