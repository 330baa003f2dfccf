"""`moshi doctor`: is this machine ready to run the models, and what stands in the way."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Annotated

import typer

from audio import FRAME_S

EPILOG = """\
Examples:

\b
  moshi doctor                      # checks for Moshika
  moshi doctor --model stt-2.6b-en  # memory needed by the large STT model
"""

# Memory a model needs to run, in GB: weights plus one conversation's KV cache and Mimi. From
# Kyutai's published figures where there are some (bf16 18 GB, q8 12 GB, MoshiVis ≈ 24 GB), else
# from the parameter counts (STT 1B: 2 GB of bf16 weights; 2.6B: 5.2 GB).
MEMORY_NEEDED_GB = {
    "moshika": 18.0, "moshiko": 18.0, "moshika-q8": 12.0, "moshiko-q8": 12.0, "moshika-vis": 24.0,
    "stt-1b-en_fr": 2.6, "stt-1b-en_fr-vad": 2.6, "stt-2.6b-en": 6.0,
}
PIPELINE_FRAMES = 25  # two seconds of audio
BUDGET_MS = FRAME_S * 1000  # a step must take less to keep up with the audio


def register(app: typer.Typer) -> None:
    app.command(short_help="Check that this machine can run the models.", epilog=EPILOG)(doctor)


def _line(ok: bool | None, text: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
    typer.echo(f"[{mark}] {text}")


def doctor(
    model: Annotated[str, typer.Option(
        "--model", "-m", metavar="MODEL", help="The model to check memory and cache for.")] = "moshika",
) -> None:
    """Check PyTorch and the accelerators, the memory the model needs, the audio devices, the
    Hugging Face Hub and cache, then run the whole pipeline for two seconds on a tiny random model.

    Exits with status 1 when something that `moshi` needs does not work.
    """
    failures = _check_model(model)
    failures += _check_torch(model)
    failures += _check_audio()
    _check_hub(model)
    failures += _check_pipeline()
    if failures:
        raise typer.Exit(1)


def _check_model(model: str) -> int:
    from engine.errors import CheckpointError
    from engine.hub import check_model_name

    try:
        check_model_name(model)
    except CheckpointError as exc:
        _line(False, str(exc))
        return 1
    return 0


def _available_memory_gb() -> float:
    """What the kernel can give a new process without swapping (MemAvailable, which counts the page
    cache; MemFree does not), or the free pages where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def _check_torch(model: str) -> int:
    import torch

    _line(True, f"PyTorch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    needed = MEMORY_NEEDED_GB.get(model)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        _line(True, f"CUDA: {name}, {free / 1e9:.1f} of {total / 1e9:.1f} GB free")
        if needed is not None:
            enough = free / 1e9 >= needed
            _line(enough, f"{model} needs about {needed:.0f} GB of GPU memory"
                  + ("" if enough else "; try the -q8 model or --quantize int8/int4"))
            return 0 if enough else 1
        return 0
    from engine.quant import grouped_kernel, int8_kernel

    mps = torch.backends.mps.is_available()
    _line(None, "no CUDA GPU" + (", MPS available (--device mps)" if mps else "") + "; the models run on the CPU")
    _line(True, f"CPU kernels: {torch.backends.cpu.get_cpu_capability()}; --quantize int8 runs {int8_kernel()}; "
          f"int4, Q8_0 and MLX files run {grouped_kernel()}")
    if needed is not None:
        available = _available_memory_gb()
        enough = available >= needed
        _line(enough, f"{model} needs about {needed:.0f} GB of memory, {available:.1f} GB is available"
              + ("" if enough else "; try a smaller model or --quantize int8/int4"))
        return 0 if enough else 1
    return 0


def _check_audio() -> int:
    from audio.devices import list_devices
    from audio.errors import AudioError

    try:
        devices = list_devices()
    except AudioError as exc:
        _line(False, f"audio: {exc}")
        return 1
    inputs = [d for d in devices if d.inputs]
    outputs = [d for d in devices if d.outputs]
    for kind, usable, is_default in (("microphone", inputs, "default_input"), ("speakers", outputs, "default_output")):
        default = next((d for d in usable if getattr(d, is_default)), None)
        if default is not None:
            _line(True, f"{kind}: {default.describe()} ({len(usable)} device(s) in all)")
        elif usable:
            _line(None, f"{kind}: no default device; choose one of {len(usable)} with --input-device/--output-device")
        else:
            _line(False, f"{kind}: no device (headless `--input FILE` still works)")
    return 0 if inputs and outputs else 1


def _check_hub(model: str) -> None:
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    from engine.hub import MODELS

    _line(None, f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    repo = MODELS.get(model, model)
    cached = try_to_load_from_cache(repo, "config.json")
    _line(None, f"{repo}: " + ("config.json is cached" if isinstance(cached, str) else "not in the cache "
                               f"(`moshi download {model}` fetches it)"))
    if constants.HF_HUB_OFFLINE:
        _line(None, "HF_HUB_OFFLINE is set: only cached files are used")
        return
    url = f"{constants.ENDPOINT}/api/models/{repo}"
    started = time.perf_counter()
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=3)
        _line(True, f"Hub reachable at {constants.ENDPOINT} ({(time.perf_counter() - started) * 1000:.0f} ms)")
    except urllib.error.HTTPError as exc:  # an answer: the Hub is there
        _line(True, f"Hub reachable at {constants.ENDPOINT} (HTTP {exc.code} for {repo})")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _line(None, f"Hub not reachable at {constants.ENDPOINT} ({reason}): use cached models with "
                    "HF_HUB_OFFLINE=1, or a local folder with --hf-repo")


def _check_pipeline() -> int:
    """Two seconds through the real engine process, on a tiny random model written for the occasion."""
    import numpy as np

    from audio import FRAME_SIZE
    from engine.interface import Failed, Output, Ready
    from engine.options import Mode, ModelOptions
    from engine.process import EngineProcess
    from engine.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="moshi-doctor-") as folder:
        write_tiny_checkpoint(folder, Mode.CHAT)
        engine = EngineProcess(Mode.CHAT, ModelOptions(hf_repo=folder, dtype="float32"))
        try:
            outputs, mimi = [], ""
            deadline = time.monotonic() + 120
            frames = iter(np.sin(np.arange(PIPELINE_FRAMES * FRAME_SIZE, dtype=np.float32) * 0.05)
                         .reshape(-1, FRAME_SIZE) * 0.3)
            while len(outputs) < PIPELINE_FRAMES and time.monotonic() < deadline:
                for event in engine.poll(timeout=0.05):
                    if isinstance(event, Failed):
                        _line(False, f"pipeline: {event.reason}")
                        return 1
                    if isinstance(event, Output):
                        outputs.append(event)
                    if isinstance(event, Ready):
                        mimi = event.info.get("mimi", "in the engine")
                    if isinstance(event, Ready) or isinstance(event, Output):
                        frame = next(frames, None)
                        if frame is not None:
                            engine.send_frame(frame)
        finally:
            engine.close()
    if len(outputs) < PIPELINE_FRAMES:
        _line(False, f"pipeline: only {len(outputs)} of {PIPELINE_FRAMES} frames came back within two minutes")
        return 1
    step_ms = statistics.median(o.timings_ms["total"] for o in outputs)
    voiced = sum(o.pcm is not None for o in outputs)
    return _pipeline_line(step_ms, voiced, mimi)


def _pipeline_line(step_ms: float, voiced: int, mimi: str) -> int:
    fast = step_ms <= BUDGET_MS
    _line(fast, f"pipeline: {PIPELINE_FRAMES} frames through the engine process on a tiny model (Mimi: {mimi}), "
                f"{voiced} answered with audio, median step {step_ms:.1f} ms (budget {BUDGET_MS:.0f} ms)"
          + ("" if fast else "; slower than real time even on a tiny model: a real one needs a GPU "
             "(--device cuda) or, on the CPU, --quantize int8 and a free machine"))
    return 0 if fast else 1
