"""Options shared by the commands that run a model (chat, see, transcribe).

Typer builds a command's options from its function's own parameters, so each command still lists
them, one line each; their names, help and types are declared here once."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from engine.options import ModelOptions

from ..errors import ArgumentError


def check_output(path: Path, option: str, inputs: Iterable[Path] = ()) -> None:
    """Before anything loads: `path` can be written as a new file, and it is none of `inputs` (by
    inode: a hard link or another spelling of an input is the same file)."""
    if path.is_dir():
        raise ArgumentError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ArgumentError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(f"{option} {path}: cannot write in {folder}: permission denied")
    for source in inputs:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise ArgumentError(f"{option} {path} is the input {source}: writing it would destroy it")


class Command(TyperCommand):
    """A command whose arguments read as its options' values do: by their metavar, `IMAGE` when
    required, `[MODEL]` when not, `[FILE]...` for several (Typer writes `{IMAGE}` in the usage and
    adds the type in the list: `INPUT <list[str]>`). cli.py gives it to every command."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: typer.Context, formatter) -> None:
        for kind, title in (("argument", "Arguments"), ("option", "Options")):
            rows = [help_record(p, ctx) for p in self.get_params(ctx) if p.param_type_name == kind]
            rows = [row for row in rows if row is not None]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def help_record(param: TyperArgument | TyperOption, ctx: typer.Context) -> tuple[str, str] | None:
    """A parameter's name and help as `--help` and the man pages list them; None when hidden."""
    record = param.get_help_record(ctx)
    if record is None or param.param_type_name != "argument":
        return record
    return _argument_name(param) + ("..." if param.nargs != 1 else ""), record[1]


def _argument_name(param: TyperArgument) -> str:
    return param.metavar or param.name.upper()


MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantize(str, Enum):
    int8 = "int8"
    int4 = "int4"


HfRepo = Annotated[Optional[str], typer.Option(
    "--hf-repo", metavar="REPO_OR_FOLDER", rich_help_panel=MODEL_PANEL,
    help="A model name, a Hugging Face repo id, or a local folder holding config.json and the files it names.")]
DeviceOption = Annotated[Device, typer.Option("--device", rich_help_panel=MODEL_PANEL, help="Where the model runs.")]
DtypeOption = Annotated[Dtype, typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL, help="Weight precision of the language model (Mimi stays float32).")]
QuantizeOption = Annotated[Optional[Quantize], typer.Option(
    "--quantize", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Quantize the language model's weights while loading: int8 (half the memory of bfloat16 and, on CPU, "
         "about 3x faster) or int4 (a quarter of the memory, with a larger error). Official q8 checkpoints are "
         "int8 without it.")]
ExactOption = Annotated[bool, typer.Option(
    "--exact", rich_help_panel=MODEL_PANEL,
    help="Mimi encodes with the kernels of Kyutai's moshi, so its codes are bit-identical to theirs, and decodes "
         "in float32. By default, on a CPU, it takes faster kernels (encoding takes 8% less time on an Intel "
         "Xeon, 40% less on an AMD EPYC) whose rounding now and then picks the other of two nearly equidistant "
         "codewords: measured on speech, under 1 codeword in 1000 (none of 18,240 on an Intel Xeon, about 1 in "
         "6,000 on an AMD EPYC, none among the 8 codebooks Moshi hears); and where the CPU multiplies bfloat16 "
         "itself (AMX, AVX512-BF16) it decodes from bfloat16 weights (a fifth less time), within 1% of the "
         "float32 audio's peak. --exact also keeps a quantized language model's activations as they are: by "
         "default, where the CPU has AVX512-VNNI and AVX512-BF16, or AVX2 without AVX-512, our kernels quantize "
         "them to int8 (in blocks of "
         "32 for int4, Q8_0 and MLX weights, as candle does; a row at a time for int8 weights, as the reference "
         "does) and multiply bytes by bytes, within about 1e-3 of each product's size.")]
Seed = Annotated[Optional[int], typer.Option("--seed", min=0, max=2**63 - 1, metavar="N",
                                             rich_help_panel=SAMPLING_PANEL,
                                             help="Random seed for sampling [default: 4242].")]
Temp = Annotated[Optional[float], typer.Option(
    "--temp", metavar="T", rich_help_panel=SAMPLING_PANEL,
    help="Audio sampling temperature; 0 = greedy [default: from the model].")]
TempText = Annotated[Optional[float], typer.Option(
    "--temp-text", metavar="T", rich_help_panel=SAMPLING_PANEL, help="Text sampling temperature; 0 = greedy.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", metavar="K", rich_help_panel=SAMPLING_PANEL,
                                             help="Sample audio among the k likeliest tokens.")]
TopKText = Annotated[Optional[int], typer.Option("--top-k-text", metavar="K", rich_help_panel=SAMPLING_PANEL,
                                                 help="Sample text among the k likeliest tokens.")]


# A conversation (chat, see) on a recording instead of the microphone.
InputRecording = Annotated[Optional[Path], typer.Option(
    "--input", "-i", metavar="AUDIO", help="Answer this recording instead of the microphone "
    "(wav, flac, ogg or mp3, any rate).")]
OutputWav = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="WAV", help="With --input: write Moshi's voice to this WAV file.")]
TranscriptFile = Annotated[Optional[Path], typer.Option(
    "--transcript", metavar="TXT", help="With --input: also write Moshi's words to this file.")]


def reject_without_input(output: Path | None, transcript: Path | None) -> None:
    """--output and --transcript belong to a conversation on a recording (--input)."""
    for value, name in ((output, "--output"), (transcript, "--transcript")):
        if value is not None:
            raise typer.BadParameter("goes with --input; a live conversation is recorded with --record DIR",
                                     param_hint=name)


LIVE_PANEL = "Live conversation"
NoTui = Annotated[bool, typer.Option(
    "--no-tui", rich_help_panel=LIVE_PANEL, help="Plain text on stdout instead of the full-screen view "
    "(for pipes and scripts); states go to stderr.")]
Record = Annotated[Optional[Path], typer.Option(
    "--record", metavar="DIR", rich_help_panel=LIVE_PANEL, help="Where each conversation's folder goes (stereo "
    "WAV, transcript, event log) [default: the XDG data dir, moshi/sessions].")]
NoRecord = Annotated[bool, typer.Option(
    "--no-record", rich_help_panel=LIVE_PANEL, help="Keep no files of the conversation (by default each one "
    "is recorded, readable by you only, and where it went is printed at the end).")]
InputDevice = Annotated[Optional[str], typer.Option(
    "--input-device", metavar="INDEX_OR_NAME", rich_help_panel=LIVE_PANEL,
    help="Microphone: an index or part of a name from `moshi devices` [default: the system's].")]
OutputDevice = Annotated[Optional[str], typer.Option(
    "--output-device", metavar="INDEX_OR_NAME", rich_help_panel=LIVE_PANEL,
    help="Speakers: an index or part of a name from `moshi devices` [default: the system's].")]
NoAec = Annotated[bool, typer.Option(
    "--no-aec", rich_help_panel=LIVE_PANEL, help="Turn echo cancellation off (with headphones, it is not needed).")]


def record_place(record: Path | None, no_record: bool) -> Path | None:
    """--record DIR, or the default place (None); --no-record goes with neither."""
    if no_record and record is not None:
        raise typer.BadParameter("--record and --no-record contradict each other", param_hint="--no-record")
    return record


def model_options(hf_repo: str | None, device: Device, dtype: Dtype, seed: int | None, temp: float | None,
                  temp_text: float | None, top_k: int | None, top_k_text: int | None,
                  quantize: Quantize | None = None, exact: bool = False) -> ModelOptions:
    for name, value in (("--temp", temp), ("--temp-text", temp_text)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ArgumentError(f"{name} must be a number from 0 (greedy) up, not {value}")
    for name, value in (("--top-k", top_k), ("--top-k-text", top_k_text)):
        if value is not None and value < 0:
            raise ArgumentError(f"{name} must be 0 (every token) or more, not {value}")
    return ModelOptions(hf_repo=hf_repo, device=device.value, dtype=dtype.value, seed=seed, temp=temp,
                        temp_text=temp_text, top_k=top_k, top_k_text=top_k_text,
                        quantize=None if quantize is None else quantize.value, exact=exact)


REMOTE_PANEL = "Remote server"
Url = Annotated[Optional[str], typer.Option(
    "--url", metavar="URL", rich_help_panel=REMOTE_PANEL, show_default=False,
    help="Use the model on a server instead of this machine: moshi serve, or Kyutai's servers. ws://HOST:PORT, "
         "wss://HOST, http(s)://HOST (the same server) or HOST:PORT (ws://, port 8998). The model options then "
         "belong to the server.")]
ApiKey = Annotated[Optional[str], typer.Option(
    "--api-key", metavar="KEY", envvar="MOSHI_API_KEY", rich_help_panel=REMOTE_PANEL, show_default=False,
    help="With --url: the key the server asks for (sent in the kyutai-api-key header).")]
Insecure = Annotated[bool, typer.Option(
    "--insecure", rich_help_panel=REMOTE_PANEL,
    help="With a wss:// URL: take the server's certificate unchecked (a self-signed test server).")]
CaCert = Annotated[Optional[Path], typer.Option(
    "--ca-cert", metavar="FILE", rich_help_panel=REMOTE_PANEL, show_default=False,
    help="With a wss:// URL: trust the authority in this PEM file (a server's self-signed certificate).")]


def remote_server(url: str | None, path: str, api_key: str | None, insecure: bool, ca_cert: Path | None):
    """The server of --url, checked before anything connects (an `engine.remote.connect.Server`), or
    None without --url. A malformed URL or a missing CA file is one line."""
    if url is None:
        for value, name in ((insecure, "--insecure"), (ca_cert, "--ca-cert")):
            if value:
                raise typer.BadParameter("goes with --url", param_hint=name)
        return None  # a key in MOSHI_API_KEY is for the runs that have a server
    from engine.remote.connect import RemoteError, Server

    try:
        return Server.from_options(url, path, api_key, insecure, ca_cert)
    except RemoteError as exc:
        raise ArgumentError(str(exc)) from None


def reject_model_options(ctx: typer.Context, names: Iterable[str]) -> None:
    """With --url the server has loaded its model: options that choose or place one here are refused."""
    for name in names:
        if ctx.get_parameter_source(name).name == "COMMANDLINE":
            raise typer.BadParameter("the server runs its own model: this option goes without --url",
                                     param_hint="--" + name.replace("_", "-"))


def progress_to_stderr(message: str) -> None:
    print(f"moshi: {message}", file=sys.stderr, flush=True)
