"""`moshi see IMAGE`: talk with MoshiVis about a picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ArgumentError
from .common import (ApiKey, CaCert, DeviceOption, DtypeOption, ExactOption, HfRepo, InputDevice, InputRecording, Insecure, NoAec,
                     NoRecord, NoTui, OutputDevice, OutputWav, QuantizeOption, Record, Seed, Temp, TempText, TopK,
                     TopKText, TranscriptFile, Url, model_options, progress_to_stderr, record_place,
                     reject_model_options, reject_without_input, remote_server)

EPILOG = """\
Examples:

\b
  moshi see photo.jpg                                      # talk about it (microphone, speakers)
  moshi see photo.jpg --no-tui --record talks/             # words to stdout, the session kept in talks/
  moshi see photo.jpg --input me.wav --output moshi.wav    # answer a recording, words to stdout
  moshi see photo.jpg --xa-start 0 --input me.wav          # look at the picture from the first frame
  moshi see photo.jpg --url gpu-box:8998                   # MoshiVis on a server (moshi serve)
"""


def register(app: typer.Typer) -> None:
    app.command(short_help="Talk with Moshi about a picture.", epilog=EPILOG)(see)


def see(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The picture to talk about (JPEG, PNG, WebP, ...).")],
    input: InputRecording = None,
    output: OutputWav = None,
    transcript: TranscriptFile = None,
    xa_start: Annotated[Optional[int], typer.Option(
        "--xa-start", min=0, metavar="FRAMES", help="Frames of 80 ms before Moshi starts looking at the "
        "picture [default: from the model, 16].")] = None,
    no_tui: NoTui = False,
    record: Record = None,
    no_record: NoRecord = False,
    input_device: InputDevice = None,
    output_device: OutputDevice = None,
    no_aec: NoAec = False,
    hf_repo: HfRepo = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "bfloat16",
    quantize: QuantizeOption = None,
    exact: ExactOption = False,
    seed: Seed = None,
    temp: Temp = None,
    temp_text: TempText = None,
    top_k: TopK = None,
    top_k_text: TopKText = None,
    url: Url = None,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    ca_cert: CaCert = None,
) -> None:
    """Talk with MoshiVis about a picture: it listens, looks and speaks at the same time.

    Live, the picture is shown beside the transcript, and each of Moshi's words is coloured by how
    much Moshi was looking at the picture as it said it (dim: not at all, bright: intently). Keys:
    q quit, space mute, r restart, o talk about another picture, s save the transcript, ? help.

    With --input, the conversation runs headless on a recording: the user's side comes from the
    file, frame by frame exactly as live audio would, and Moshi's side goes to --output and stdout.

    With --url, MoshiVis runs on a server (moshi serve, or Kyutai's MoshiVis server): the picture is
    sent to it first, and this terminal keeps the rest.
    """
    from engine.options import Mode, SeeOptions
    from engine.wire import CHAT_PATH

    from .chat import LOCAL_MODEL_OPTIONS

    server = remote_server(url, CHAT_PATH, api_key, insecure, ca_cert)
    if server is not None:
        reject_model_options(ctx, LOCAL_MODEL_OPTIONS)

    base = model_options(hf_repo or Mode.SEE.default_model, device, dtype, seed, temp, temp_text, top_k, top_k_text,
                         quantize, exact)
    options = SeeOptions(**vars(base), image=str(image), xa_start=xa_start)
    from ..picture import PictureError, load_picture

    try:
        load_picture(image)  # a bad file fails now, not in the engine after the model has loaded
    except PictureError as exc:
        raise ArgumentError(str(exc)) from None
    if input is not None:
        if server is not None:
            from .chat import run_headless_remote

            run_headless_remote(input, output, transcript, server, options)
        else:
            run_headless_see(input, output, transcript, options)
        return
    reject_without_input(output, transcript)
    from ..session import SessionOptions, run

    run(SessionOptions(mode=Mode.SEE, model=options, input_device=input_device, output_device=output_device,
                       aec=not no_aec, record_dir=record_place(record, no_record), record=not no_record,
                       tui=not no_tui, server=server))


def run_headless_see(input: Path, output: Path | None, transcript: Path | None, options) -> None:
    from engine.moshivis.runner import SeeRunner

    from .chat import RunnerSteps, run_headless_conversation

    run_headless_conversation(input, output, transcript, lambda: RunnerSteps(SeeRunner.load(options, progress_to_stderr)))
