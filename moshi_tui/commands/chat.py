"""`moshi chat`: a spoken conversation with Moshi."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import (LIVE_PANEL, ApiKey, CaCert, DeviceOption, DtypeOption, ExactOption, HfRepo, InputDevice,
                     InputRecording, Insecure, NoAec, NoRecord, NoTui, OutputDevice, OutputWav, QuantizeOption,
                     Record, Seed, Temp, TempText, TopK, TopKText, TranscriptFile, Url, check_output, model_options,
                     progress_to_stderr, record_place, reject_model_options, reject_without_input, remote_server)

EPILOG = """\
Examples:

\b
  moshi chat                                    # Moshika, microphone and speakers
  moshi chat --voice moshiko                    # the male voice
  moshi chat --input me.wav --output moshi.wav  # answer a recording, words to stdout
  moshi chat --hf-repo ./tiny --input me.wav    # a local folder (see moshi tiny-model)
  moshi chat --url gpu-box:8998                 # the model on a server (moshi serve, or Kyutai's)
  moshi chat --url wss://moshi.example.org --input me.wav --output moshi.wav
"""
# Options that load or place a model here; with --url the server has its own.
LOCAL_MODEL_OPTIONS = ("hf_repo", "device", "dtype", "quantize", "exact")


UserStt = Annotated[str, typer.Option(
    "--user-stt", metavar="MODEL", rich_help_panel=LIVE_PANEL,
    help="Show your words too, recognised by this Kyutai STT model beside Moshi (stt-1b-en_fr, a repo id or a "
         "folder), or off. auto: stt-1b-en_fr where it is in the Hugging Face cache (moshi download "
         "stt-1b-en_fr) and the warm step with it stays within the 80 ms budget. It reads Mimi's codes for Moshi "
         "and adds only its language model to each step. On a CPU that step is dear: measured on 2 busy shared "
         "cores, one thread, the STT-1B shapes took about 0.8 s per 80 ms frame in int8 and 0.6-1 s in bfloat16 "
         "(the tiny test model: 15 ms), so auto leaves it off there.")]


class Voice(str, Enum):
    moshika = "moshika"
    moshiko = "moshiko"


def register(app: typer.Typer) -> None:
    app.command(short_help="Talk with Moshi.", epilog=EPILOG)(chat)


def chat(
    ctx: typer.Context,
    input: InputRecording = None,
    output: OutputWav = None,
    transcript: TranscriptFile = None,
    voice: Annotated[Voice, typer.Option("--voice", help="Moshika (female) or Moshiko (male).")] = Voice.moshika,
    no_tui: NoTui = False,
    record: Record = None,
    no_record: NoRecord = False,
    input_device: InputDevice = None,
    output_device: OutputDevice = None,
    no_aec: NoAec = False,
    user_stt: UserStt = "auto",
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
    """Talk with Moshi: it listens and speaks at the same time.

    Live, the model runs in its own process while the terminal shows the transcript, latency and
    levels; every conversation is recorded (--record). Keys: q quit, space mute, r restart, s save
    the transcript, ? help.

    With --input, the conversation runs headless on a recording: the user's side comes from the
    file, frame by frame exactly as live audio would, and Moshi's side goes to --output and stdout.

    With --url, the model runs on a server (moshi serve, Kyutai's moshi.server or moshi-server) and
    this terminal keeps the rest: the screen, echo cancellation, the recording.
    """
    from engine.wire import CHAT_PATH

    server = remote_server(url, CHAT_PATH, api_key, insecure, ca_cert)
    if server is not None:
        reject_model_options(ctx, LOCAL_MODEL_OPTIONS + ("voice", "user_stt"))
    if hf_repo is not None and ctx.get_parameter_source("voice").name == "COMMANDLINE":
        raise typer.BadParameter("--hf-repo names the model, and with it the voice: give one of the two",
                                 param_hint="--voice")
    options = model_options(hf_repo or voice.value, device, dtype, seed, temp, temp_text, top_k,
                            top_k_text, quantize, exact)
    options.user_stt = user_stt
    if input is not None:
        if server is not None:
            run_headless_remote(input, output, transcript, server, options)
        else:
            run_headless_chat(input, output, transcript, options)
        return
    reject_without_input(output, transcript)
    from engine.options import Mode

    from ..session import SessionOptions, run

    run(SessionOptions(mode=Mode.CHAT, model=options, input_device=input_device, output_device=output_device,
                       aec=not no_aec, record_dir=record_place(record, no_record), record=not no_record,
                       tui=not no_tui, server=server))


def run_headless_chat(input: Path, output: Path | None, transcript: Path | None, options) -> None:
    from engine.moshi.runner import ChatRunner
    from engine.runner import FirstFrame

    run_headless_conversation(input, output, transcript, lambda: RunnerSteps(
        ChatRunner.load(options, progress_to_stderr, FirstFrame.RUN_INFERENCE)))


def run_headless_remote(input: Path, output: Path | None, transcript: Path | None, server, options) -> None:
    """`--input` with `--url`: the recording goes to the server as fast as it answers (at most the
    engine's frames in flight ahead), each answer to ``output`` and stdout as locally."""
    from engine.remote.chat import RemoteEngine, chat_query

    image = getattr(options, "image", None)  # `moshi see`: the picture goes first
    run_headless_conversation(
        input, output, transcript,
        lambda: EngineSteps(RemoteEngine(server, chat_query(options), None if image is None else Path(image).read_bytes())))


class EngineSteps:
    """A `RemoteEngine` read as a runner: `steps` sends frames while it takes them and yields each
    answer in order, the last one with the text the server sent after it (`tail`). Its `Loading`
    notices go to stderr; a `Failed` raises."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def close(self) -> None:
        self.engine.close()

    def steps(self, frames):
        from dataclasses import replace

        from engine.errors import EngineError
        from engine.interface import Failed, Loading, Output, Ready

        engine, live, last = self.engine, False, None  # the answer held back for what may follow it
        frame, sent, answered = next(frames, None), 0, 0
        while True:
            if live:
                while frame is not None and engine.in_flight < engine.max_in_flight and engine.send_frame(frame):
                    sent += 1
                    frame = next(frames, None)
                if frame is None and answered == sent:
                    if last is not None:
                        yield replace(last, text=((last.text or "") + engine.tail()) or None)
                    return
            for event in engine.poll(timeout=0.05):
                if isinstance(event, Loading):
                    progress_to_stderr(event.detail)
                elif isinstance(event, Ready):
                    live = True
                elif isinstance(event, Failed):
                    if last is not None:
                        yield last
                    raise EngineError(event.reason)
                elif isinstance(event, Output):
                    answered += 1
                    if last is not None:
                        yield last
                    last = event


class RunnerSteps:
    """A runner (engine/runner.py) stepped on this thread, one frame at a time."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def close(self) -> None:
        self.runner.close()

    def steps(self, frames):
        for frame in frames:
            yield self.runner.step(frame)


def run_headless_conversation(input: Path, output: Path | None, transcript: Path | None, load) -> None:
    """Feed a recording to a conversation frame by frame (`load` gives a `RunnerSteps` or `EngineSteps`);
    Moshi's voice to ``output``, words to stdout. The recording is read and resampled block by block
    as the frames go."""
    import numpy as np

    from audio import FRAME_SIZE, SAMPLE_RATE
    from audio.inputs import file_input
    from audio.outputs import open_new_text
    from audio.wav import WavWriter
    from engine.stt.transcription import padded_frames

    for path, option in ((output, "--output"), (transcript, "--transcript")):
        if path is not None:
            check_output(path, option, [input])
    recording = file_input(input)  # checked now: a bad file fails before minutes of loading
    conversation = load()
    writer = WavWriter(output, SAMPLE_RATE, channels=1) if output else None
    words = open_new_text(transcript) if transcript else None
    try:
        # whole frames only, as Kyutai's `moshi-inference`
        for out in conversation.steps(padded_frames(recording.open(), 0, 0)):
            if writer is not None:
                # A frame answered with no voice (MoshiVis's first) is silence: the reply keeps the input's timeline.
                writer.write(np.zeros(FRAME_SIZE, np.float32) if out.pcm is None else out.pcm)
            if out.text:
                sys.stdout.write(out.text)
                sys.stdout.flush()
                if words is not None:
                    words.write(out.text)
                    words.flush()
        sys.stdout.write("\n")
    finally:
        conversation.close()
        if writer is not None:
            writer.close()
        if words is not None:
            words.close()
