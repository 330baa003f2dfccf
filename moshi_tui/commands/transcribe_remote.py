"""`moshi transcribe --url`: files, standard input or the microphone transcribed on a server, with
the same writers and printers as a local run. Several files go as several streams at once (at
most --batch-size), which the server steps in one batch."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import typer

from ..transcript_writers import CueLimits, TranscriptWriter
from .common import check_output

STDIN = "-"


def run_remote(server, names: list[str], writers: list[type[TranscriptWriter]], output_dir: Path | None,
               rate: int | None, limits: CueLimits, pause: float, batch_size: int, stats: bool) -> None:
    from audio.inputs import file_input, stdin_input

    from .transcribe import _output_paths

    # Every input is checked, and every output path decided, before anything connects.
    sources = [stdin_input(rate) if name == STDIN else file_input(name) for name in names]
    targets = _output_paths([s.stem for s in sources] or ["microphone"], writers, output_dir)
    files = [Path(name) for name in names if name != STDIN]
    for paths in targets:
        for path in paths.values():
            if path is not None:
                check_output(path, "--output-dir", files)
    mic = None
    if not sources:
        from engine.options import Mode

        from ..session import SessionOptions, open_source

        mic = open_source(SessionOptions(mode=Mode.TRANSCRIBE, tui=False, record=False))
    try:
        failed, interrupted = asyncio.run(_run(server, sources, mic, targets, limits, pause, batch_size, stats))
    finally:
        if mic is not None:
            mic.close()
    if interrupted is not None:
        print("moshi: interrupted; the transcripts hold what was recognised so far", file=sys.stderr)
        raise typer.Exit(128 + interrupted)
    if failed:
        raise typer.Exit(1)


async def _run(server, sources, mic, targets, limits, pause, batch_size, stats) -> tuple[int, int | None]:
    import aiohttp

    from audio.errors import AudioError
    from engine.remote.asr import transcribe_stream
    from engine.remote.connect import RemoteError

    from .transcribe import _listeners, transcript_info

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # a signal ends the input; the words in flight still come
    interrupted: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, lambda signum=signum: (interrupted.append(signum), stop.set()))
    slots = asyncio.Semaphore(batch_size)
    count = max(len(sources), 1)

    async with aiohttp.ClientSession() as session:
        info = transcript_info(await _model_of(session, server), pause)

        async def one(source, paths) -> bool:
            name = source.name if source is not None else "microphone"
            async with slots:
                try:
                    ws = await server.connect(session)
                except RemoteError as exc:
                    print(f"moshi: error: {exc}", file=sys.stderr, flush=True)
                    return False
                listener = _listeners(name, paths, info, count, limits)
                read = _mic_reader(mic, stop) if source is None else _file_reader(source, stop)
                if source is None:
                    print(f"moshi: listening on {server.shown} (Ctrl-C ends it)", file=sys.stderr, flush=True)
                try:
                    async with ws:
                        run = await transcribe_stream(ws, read, listener, pause, server.shown)
                except (RemoteError, AudioError) as exc:
                    more = "; going on with the others" if count > 1 else ""
                    print(f"moshi: error: {name}: {exc}{more}", file=sys.stderr, flush=True)
                    return False
            if stats:
                print(f"moshi: {name}: {run.audio_seconds:.1f} s of audio in {run.wall_seconds:.1f} s on "
                      f"{server.shown}: real-time factor {run.real_time_factor:.3f}", file=sys.stderr)
            return True

        done = await asyncio.gather(*(one(source, paths) for source, paths in zip(sources or [None], targets)))
    return done.count(False), (interrupted[0] if interrupted else None)


async def _model_of(session, server) -> dict:
    """The model as `moshi serve` describes it in /api/modules_info; a server that does not (Kyutai's)
    is named by its URL, with what its protocol implies."""
    url = server.url.replace("ws", "http", 1).rsplit("/api/", 1)[0] + "/api/modules_info"
    try:
        async with session.get(url, headers=server.headers, ssl=server.ssl or True, timeout=5) as response:
            modules = await response.json()
        for module in modules.values():
            if isinstance(module, dict) and isinstance(module.get("transcript_model"), dict):
                return module["transcript_model"]
    except Exception:  # any server may answer anything here; the transcription does not depend on it
        pass
    return {"name": server.shown, "delay_seconds": 0.0, "silence_prefix_seconds": 0.0, "vad_heads": False,
            "device": "server", "dtype": "bfloat16", "temp_text": 0.0, "top_k_text": 0}


def _file_reader(source, stop: asyncio.Event):
    blocks = None

    async def read():
        nonlocal blocks
        if stop.is_set():
            return None
        if blocks is None:
            blocks = iter(await asyncio.to_thread(source.open))
        return await asyncio.to_thread(next, blocks, None)

    return read


def _mic_reader(mic, stop: asyncio.Event):
    async def read():
        while not stop.is_set() and not mic.finished:
            frame = await asyncio.to_thread(mic.read, 0.1)
            if frame is not None:
                return frame
        return None

    return read
