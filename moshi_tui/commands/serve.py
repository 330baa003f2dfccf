"""`moshi serve`: the model as a service, behind Kyutai's websocket protocols."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ArgumentError
from .common import (DeviceOption, DtypeOption, ExactOption, HfRepo, QuantizeOption, Seed, Temp, TempText, TopK,
                     TopKText, model_options, progress_to_stderr)

EPILOG = """\
Examples:

\b
  moshi serve --device cuda                       # Moshi at ws://127.0.0.1:8998/api/chat
  moshi serve --hf-repo moshika-vis --device cuda # MoshiVis: the picture first, then the talk
  moshi serve --hf-repo kyutai/stt-1b-en_fr       # speech to text at ws://127.0.0.1:8998/api/asr-streaming
  moshi serve --host 0.0.0.0 --api-key "$KEY" --ssl certs/ --batch-size 8
  moshi serve --static ~/moshi-client/dist        # Kyutai's web client at http://127.0.0.1:8998/
  moshi chat --url ws://gpu-box:8998              # on the laptop (or over `ssh -L 8998:localhost:8998`)
"""

SERVER_PANEL = "Server"
# Conversations stepped at once when --batch-size is not given: a CPU has no spare compute to share.
DEFAULT_BATCH = {"cpu": 1, "mps": 1, "cuda": 4}
KEYS_VARIABLE = "MOSHI_API_KEYS"


def register(app: typer.Typer) -> None:
    app.command(short_help="Serve a model over Kyutai's websocket protocols.", epilog=EPILOG)(serve)


def serve(
    hf_repo: HfRepo = None,
    quantize: QuantizeOption = None,
    exact: ExactOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "bfloat16",
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDRESS", rich_help_panel=SERVER_PANEL,
        help="Address to listen on; anything but loopback lets other machines in (use --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT", rich_help_panel=SERVER_PANEL,
                                      help="TCP port to listen on.")] = 8998,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, metavar="N", rich_help_panel=SERVER_PANEL, show_default=False,
        help="Conversations at once, stepped as one batch; one more is refused with \"no free channels\" "
             "[default: 1 on cpu and mps, 4 on cuda].")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(
        "--api-key", metavar="KEY", rich_help_panel=SERVER_PANEL, show_default=False,
        help=f"Let in only clients that send this key (header kyutai-api-key, or ?auth_id=); repeatable. "
             f"Also read from {KEYS_VARIABLE} (comma-separated).")] = None,
    ssl: Annotated[Optional[Path], typer.Option(
        "--ssl", metavar="DIR", rich_help_panel=SERVER_PANEL, show_default=False,
        help="Serve wss:// and https:// with DIR/cert.pem and DIR/key.pem.")] = None,
    static: Annotated[Optional[Path], typer.Option(
        "--static", metavar="DIR", rich_help_panel=SERVER_PANEL, show_default=False,
        help="Serve this folder at / (Kyutai's web client, built: its dist folder).")] = None,
    seed: Seed = None,
    temp: Temp = None,
    temp_text: TempText = None,
    top_k: TopK = None,
    top_k_text: TopKText = None,
) -> None:
    """Serve a model over Kyutai's websocket protocols: Moshi and MoshiVis at /api/chat, for Kyutai's
    web client, `python -m moshi.client` and `moshi chat --url`; speech to text at
    /api/asr-streaming, as Kyutai's moshi-server, for its STT scripts and `moshi transcribe --url`.
    Several conversations are stepped as one batch. The sampling options are the defaults: a chat
    client may ask for its own in the query string (text_temperature, text_topk, audio_temperature,
    audio_topk, text_seed, audio_seed). Also: /healthz, /api/build_info, /api/modules_info and
    Prometheus /metrics. SIGTERM drains: the sessions are closed cleanly, then the server exits 0."""
    options = model_options(hf_repo, device, dtype, seed, temp, temp_text, top_k, top_k_text, quantize, exact)
    keys = tuple(api_key or ()) + tuple(k for k in re.split(r"[,\s]+", os.environ.get(KEYS_VARIABLE, "")) if k)
    context_folder = _check_ssl(ssl)
    if static is not None and not static.is_dir():
        raise ArgumentError(f"--static {static}: not a folder")
    _check_port(host, port)
    if not keys and not _loopback(host):
        print(f"moshi: warning: listening on {host} without --api-key: anyone who reaches this port can use the "
              "model", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from engine.server.app import make_app, ssl_context
    from engine.server.services import load_service

    service = load_service(options, batch_size or DEFAULT_BATCH[options.device], progress_to_stderr)
    app = make_app(service, keys, static)
    context = ssl_context(context_folder) if context_folder else None
    sys.exit(asyncio.run(_run(app, host, port, context)))


async def _run(app, host: str, port: int, context) -> int:
    """Serve until SIGTERM (exit 0) or SIGINT (130); both drain first."""
    from engine.server.app import serve_until

    stop = asyncio.Event()
    status = {"code": 0}
    loop = asyncio.get_running_loop()
    for signum, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
        loop.add_signal_handler(signum, lambda code=code: (status.update(code=code), stop.set()))
    await serve_until(app, host, port, stop, context)
    logging.getLogger("moshi.serve").info("drained; exiting")
    return status["code"]


def _check_ssl(folder: Path | None) -> Path | None:
    if folder is None:
        return None
    for name in ("cert.pem", "key.pem"):
        if not (folder / name).is_file():
            raise ArgumentError(f"--ssl {folder}: no {name} there (the folder holds cert.pem and key.pem)")
    return folder


def _check_port(host: str, port: int) -> None:
    """Before minutes of loading: the address can be listened on."""
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise ArgumentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
