"""`moshi transcribe`: streaming speech recognition with Kyutai STT."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from engine.options import Mode
from engine.wire import ASR_PATH

from .. import signals
from ..transcript_writers import CHOICES, CueLimits, TranscriptWriter, writers_for
from .common import (MODEL_PANEL, ApiKey, CaCert, DeviceOption, DtypeOption, ExactOption, Insecure, QuantizeOption, Seed, Url,
                     check_output, model_options, progress_to_stderr, remote_server)

EPILOG = """\
Examples:

\b
  moshi transcribe talk.mp3                          # words to stdout as they come
  moshi transcribe --model stt-2.6b-en talk.wav      # the larger English model
  moshi transcribe *.wav -f srt -o subs/             # one subtitle file per input, in one batch
  moshi transcribe talk.flac -f all -o out/ --stats  # txt, srt, vtt, json and jsonl
  moshi transcribe --quantize int8                   # the microphone, in real time on a 2-core CPU
  ffmpeg -i talk.m4a -f wav - | moshi transcribe -   # any stream ffmpeg or sox can write
  arecord -f S16_LE -r 16000 | moshi transcribe - --raw --rate 16000
  moshi transcribe --url gpu-box:8998 talk.mp3       # on a server: moshi serve, or Kyutai's moshi-server
"""

OUTPUT_PANEL = "Output"
STDIN = "-"


def register(app: typer.Typer) -> None:
    app.command(short_help="Transcribe speech as it is spoken.", epilog=EPILOG)(transcribe)


def transcribe(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="FILE", show_default=False,
        help="Audio files (wav, flac, ogg or mp3, any rate, any length), or - for standard input. "
             "Several files are transcribed together, as one batch. None: the microphone.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", "--hf-repo", metavar="NAME_OR_FOLDER", rich_help_panel=MODEL_PANEL,
        help="stt-1b-en_fr (English and French, 0.5 s delay), stt-1b-en_fr-vad (the same with end-of-turn "
             "detection), stt-2.6b-en (English, 2.5 s delay), a Hugging Face repo id, or a local folder "
             "[default: stt-1b-en_fr].")] = None,
    no_tui: Annotated[bool, typer.Option(
        "--no-tui", help="Microphone: the words on stdout as they are recognised, not the full-screen view.")] = False,
    no_record: Annotated[bool, typer.Option(
        "--no-record", help="Microphone, full-screen view: keep no session files (by default the session is "
        "recorded, readable by you only, and where it went is printed at the end).")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Standard input is headerless 16-bit little-endian mono PCM (needs --rate).")] = False,
    rate: Annotated[Optional[int], typer.Option(
        "--rate", min=1, metavar="HZ", help="Sample rate of --raw input.")] = None,
    output_format: Annotated[Optional[Literal[CHOICES]], typer.Option(
        "--output-format", "-f", rich_help_panel=OUTPUT_PANEL, show_default=False,
        help="txt (a line per segment), srt, vtt, json, jsonl, or all of them. Without --output-dir, a single "
             "input's transcript goes to stdout [default: the words as they come; txt with --output-dir].")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", metavar="DIR", rich_help_panel=OUTPUT_PANEL,
        help="Write one file per input and format here (FILE-NAME.FORMAT), as the words arrive.")] = None,
    max_line_width: Annotated[int, typer.Option(
        "--max-line-width", min=1, metavar="CHARS", rich_help_panel=OUTPUT_PANEL,
        help="SRT/VTT: longest subtitle line (a longer word gets a line of its own).")] = 42,
    max_words_per_line: Annotated[int, typer.Option(
        "--max-words-per-line", min=0, metavar="N", rich_help_panel=OUTPUT_PANEL,
        help="SRT/VTT: most words in one subtitle line; 0 = no limit.")] = 0,
    pause: Annotated[float, typer.Option(
        "--pause", min=0.08, metavar="SECONDS", rich_help_panel=OUTPUT_PANEL,
        help="A new segment starts after this much silence (and at a predicted end of turn, "
             "with the VAD heads).")] = 1.0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, metavar="N", rich_help_panel=MODEL_PANEL,
        help="Inputs transcribed at once; a slot that finishes takes the next input.")] = 8,
    stats: Annotated[bool, typer.Option(
        "--stats", help="At the end, print the real-time factor, the model's delay and the frames processed.")] = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "bfloat16",
    quantize: QuantizeOption = None,
    exact: ExactOption = False,
    seed: Seed = None,
    url: Url = None,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    ca_cert: CaCert = None,
) -> None:
    """Transcribe speech with Kyutai STT, with word timestamps, as the words are recognised.

    Memory stays flat however long the input: files and streams are read block by block, and
    output files are written while the words arrive, so an interrupted run (Ctrl-C) keeps
    everything recognised so far.
    """
    options = model_options(model, device, dtype, seed, None, None, None, None, quantize, exact)
    inputs = inputs or []
    if (raw or rate is not None) and inputs != [STDIN]:
        raise typer.BadParameter("--raw and --rate read standard input: give - as the only FILE", param_hint="--raw")
    if raw != (rate is not None):
        raise typer.BadParameter("--raw needs --rate HZ, and --rate only goes with --raw", param_hint="--rate")
    if inputs.count(STDIN) > 1:
        raise typer.BadParameter("standard input (-) can be read only once", param_hint="FILE")
    writers = _writers(output_format, output_dir, max(len(inputs), 1))
    limits = CueLimits(max_line_width, max_words_per_line)
    server = remote_server(url, ASR_PATH, api_key, insecure, ca_cert)
    if server is not None:
        for value, name in ((model, "--model"), (quantize, "--quantize"), (seed, "--seed"), (exact or None, "--exact")):
            if value is not None:
                raise typer.BadParameter("the server has its model: leave it out with --url", param_hint=name)
        if not inputs and not no_tui:
            raise typer.BadParameter("the microphone with --url writes to stdout and files: add --no-tui",
                                     param_hint="--url")
        from .transcribe_remote import run_remote

        run_remote(server, inputs, writers, output_dir, rate, limits, pause, batch_size, stats)
        return
    if not inputs:
        _run_live(options, no_tui, no_record, writers, output_dir, limits, pause, stats)
        return
    _run_files(inputs, options, writers, output_dir, rate, limits, pause, batch_size, stats)


def _writers(output_format: str | None, output_dir: Path | None, count: int) -> list[type[TranscriptWriter]]:
    if output_format is None:
        return writers_for("txt") if output_dir is not None else []
    writers = writers_for(output_format)
    if output_dir is None and (len(writers) > 1 or count > 1):
        raise typer.BadParameter("several transcripts cannot share stdout: add --output-dir DIR",
                                 param_hint="--output-format")
    return writers


def _run_files(names: list[str], options, writers: list[type[TranscriptWriter]], output_dir: Path | None,
               rate: int | None, limits: CueLimits, pause: float, batch_size: int, stats: bool) -> None:
    from engine.stt.runner import TranscribeRunner
    from engine.stt.transcription import BatchTranscriber

    from audio.errors import AudioError
    from audio.inputs import file_input, stdin_input

    # Every input is checked, and every output path decided, before the model loads.
    inputs = [stdin_input(rate) if name == STDIN else file_input(name) for name in names]
    targets = _output_paths([i.stem for i in inputs], writers, output_dir)
    files = [Path(name) for name in names if name != STDIN]
    for paths in targets:
        for path in paths.values():
            if path is not None:
                check_output(path, "--output-dir", files)
    runner = TranscribeRunner.load(options, progress=progress_to_stderr, batch_size=min(batch_size, len(inputs)))
    info = _model_info(runner, pause)

    def jobs():
        for source, paths in zip(inputs, targets):
            yield _opened_late(source), _listeners(source.name, paths, info, len(inputs), limits)

    def report(index: int, error: Exception) -> None:
        more = "; going on with the others" if len(inputs) > 1 else ""
        print(f"moshi: error: {error}{more}", file=sys.stderr, flush=True)

    transcriber = BatchTranscriber(runner, pause_seconds=pause, input_errors=(AudioError,), on_failure=report)
    try:
        with signals.raising():
            run = transcriber.run(jobs())
    except KeyboardInterrupt as exc:
        print("moshi: interrupted; the transcripts hold what was recognised so far", file=sys.stderr)
        raise typer.Exit(signals.exit_status(exc))
    finally:
        runner.close()
    if stats:
        _print_stats(run, runner)
    if run.failed:
        if len(inputs) > 1:
            names = ", ".join(inputs[index].name for index, _ in sorted(run.failed, key=lambda f: f[0]))
            print(f"moshi: error: {len(run.failed)} of {len(inputs)} inputs could not be read to the end "
                  f"(their transcripts are incomplete): {names}", file=sys.stderr)
        raise typer.Exit(1)


def _opened_late(source):
    """The input's blocks, opened when its slot reads the first: an error in opening is then the
    input's own failure, like an error in decoding."""
    yield from source.open()


def _output_paths(stems: list[str], writers: list[type[TranscriptWriter]],
                  output_dir: Path | None) -> list[dict[type[TranscriptWriter], Path | None]]:
    """Each input's writers, each with its file (None: stdout)."""
    from engine.errors import EngineError

    if output_dir is None:
        return [{writer: None for writer in writers} for _ in stems]
    if output_dir.exists() and not output_dir.is_dir():
        raise EngineError(f"--output-dir {output_dir} is a file, not a folder")
    for stem in stems:
        if stems.count(stem) > 1:
            raise EngineError(f"two inputs are named {stem!r}: their transcripts would overwrite each other in "
                              f"{output_dir}; transcribe them in separate runs")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create --output-dir {output_dir}: {exc.strerror}") from exc
    if not os.access(output_dir, os.W_OK):
        raise EngineError(f"cannot write in --output-dir {output_dir}: permission denied")
    return [{writer: output_dir / f"{stem}.{writer.extension}" for writer in writers} for stem in stems]


def _listeners(name: str, paths: dict[type[TranscriptWriter], Path | None], info: dict, count: int,
               limits: CueLimits):
    from engine.stt.words import Listeners

    from ..transcript_writers import UntimedWarning, WordPrinter

    listeners = [writer.open(path, sys.stdout, {"source": name, **info}, limits) for writer, path in paths.items()]
    to_stdout = any(path is None for path in paths.values())
    if not to_stdout:
        listeners.append(WordPrinter(sys.stdout, name if count > 1 else None))
    return Listeners([*listeners, UntimedWarning(sys.stderr, name)])


def _model_info(runner, pause: float) -> dict:
    return transcript_info(runner.model_info(), pause)


def transcript_info(model: dict, pause: float) -> dict:
    """What a transcript file says of how it was made: the model (`TranscribeRunner.model_info`) and the segmentation."""
    from engine.stt.words import END_OF_TURN_THRESHOLD

    return {"model": model, "segmentation": {"pause_seconds": pause,
                                             "end_of_turn_threshold": END_OF_TURN_THRESHOLD if model["vad_heads"] else None}}


def _print_stats(run, runner) -> None:
    speed = f"{1 / run.real_time_factor:.1f}x" if run.real_time_factor > 0 else "?"
    print(f"moshi: {run.audio_seconds:.1f} s of audio in {run.wall_seconds:.1f} s: real-time factor "
          f"{run.real_time_factor:.3f} ({speed} real time); model delay "
          f"{runner.delay_seconds:g} s, silence prefix {runner.silence_prefix_seconds:g} s; {run.frames} frames in "
          f"{run.steps} steps of batch {runner.batch_size}", file=sys.stderr)


def _run_live(options, no_tui: bool, no_record: bool, writers: list[type[TranscriptWriter]], output_dir: Path | None,
              limits: CueLimits, pause: float, stats: bool) -> None:
    """The microphone: the full-screen view, or with --no-tui the words on stdout (and in files)."""
    from ..session import SessionOptions, open_source, run

    session = SessionOptions(mode=Mode.TRANSCRIBE, model=options, tui=not no_tui, record=not no_record)
    if not no_tui:
        if writers:
            raise typer.BadParameter("the full-screen view saves its own transcript; add --no-tui to write "
                                     "--output-format files from the microphone", param_hint="--output-format")
        run(session)
        return
    from engine.stt.runner import TranscribeRunner
    from engine.stt.transcription import LiveTranscriber

    source = open_source(session)  # a missing or busy device fails here, before the model loads
    try:
        paths = _output_paths(["microphone"], writers, output_dir)[0]
        runner = TranscribeRunner.load(options, progress=progress_to_stderr)
        live = LiveTranscriber(runner, _listeners("microphone", paths, _model_info(runner, pause), 1, limits), pause)
        print("moshi: listening (Ctrl-C ends it)", file=sys.stderr, flush=True)
        try:
            interrupted = transcribe_source(source, live)
        finally:
            runner.close()
    finally:
        source.close()
    if stats:
        _print_stats(live.stats, runner)
    if interrupted is not None:
        raise typer.Exit(signals.exit_status(interrupted))


def transcribe_source(source, live) -> KeyboardInterrupt | None:
    """Frames from a live source until it ends or Ctrl-C, then the words still in flight. Returns
    the interruption that ended it (the command then exits 130, 143 or 129), or None."""
    interrupted = None
    with signals.raising():
        try:
            while not source.finished:
                frame = source.read(timeout=0.1)
                if frame is not None:
                    live.push(frame)
        except KeyboardInterrupt as exc:
            interrupted = exc  # the usual way to end a live transcription
    live.finish()
    return interrupted
