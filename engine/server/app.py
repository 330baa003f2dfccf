"""The web application around one ``Service``, and what every endpoint shares.

A service owns one websocket path and its sessions; the application checks the API key before the
upgrade, hands the service each accepted websocket, logs one line per connection, serves the JSON
and Prometheus endpoints, and on shutdown drains: new sessions are refused, the service ends its
own cleanly, then whatever websocket is left is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import platform
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import WSCloseCode, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import wire
from .metrics import ServiceMetrics

log = logging.getLogger("moshi.serve")

# The largest client message: a MoshiVis picture (a photo's JPEG or PNG) is the largest there is.
MAX_MESSAGE_BYTES = 16 << 20
# What the kernel keeps to send to a client: seconds of Opus (4 kB/s), yet little enough that a
# client that stops reading is noticed (the service then drops its oldest audio) before megabytes
# pile up for it.
SEND_BUFFER_BYTES = 16 << 10
SERVICE_KEY = web.AppKey("service", object)
SOCKETS_KEY = web.AppKey("sockets", dict)
CLOSE_TIMEOUT_S = 2.0  # a client that does not take the close frame in this time is cut off
STATE_KEY = web.AppKey("state", dict)


@dataclass
class SessionStats:
    """What a session did, for its log line; a service fills it in while the session runs."""

    frames: int = 0  # frames of the client's audio stepped
    dropped: int = 0  # frames dropped because the client fell behind
    refused: bool = False  # every slot was taken
    error: str = ""  # why the session ended early, as the client was told


@runtime_checkable
class Service(Protocol):
    """One endpoint of the server: what the application needs from it."""

    path: str  # its websocket path (`wire.CHAT_PATH`, `wire.ASR_PATH`)
    model: str  # the model it serves, as named to the user
    slots: int  # conversations it holds at once
    metrics: ServiceMetrics

    def free_slots(self) -> int:
        """Slots a new session could take now."""

    def info(self) -> dict[str, Any]:
        """This service's entry of `/api/modules_info` (JSON values)."""

    def refusal(self, request: web.Request) -> str | None:
        """Why this request's query cannot open a session (then answered HTTP 400 before the
        upgrade, as Kyutai's Rust servers answer a query they cannot read), or None."""

    async def start(self) -> None:
        """Called once, before the first session (the model is loaded and warm already)."""

    async def handle(self, ws: web.WebSocketResponse, request: web.Request, stats: SessionStats) -> None:
        """Run one session on an accepted, authenticated websocket, filling in `stats`; return when it
        ends. Every slot taken: tell the client at once in the protocol's words, set `stats.refused`,
        return. A client's malformed message ends its session only."""

    async def stop(self) -> None:
        """Drain: end every open session cleanly (the client is told), stop stepping; idempotent."""


def authorized(request: web.Request, keys: tuple[str, ...]) -> bool:
    """No keys: everyone. Otherwise the header or the query parameter must hold one, compared in
    constant time (each key is compared, whichever matches)."""
    if not keys:
        return True
    given = (request.headers.get(wire.API_KEY_HEADER) or request.query.get(wire.API_KEY_QUERY) or "").encode()
    match = False
    for key in keys:
        match |= hmac.compare_digest(given, key.encode())
    return match


def peer_of(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


async def close(ws: web.WebSocketResponse, request: web.Request, code: int = WSCloseCode.OK,
                message: bytes = b"") -> None:
    """Close a session's websocket; a client that takes nothing more (it stopped reading) is cut off."""
    if ws.closed:
        return
    try:
        await asyncio.wait_for(ws.close(code=code, message=message), CLOSE_TIMEOUT_S)
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()


def make_app(service: Service, api_keys: tuple[str, ...] = (), static_dir: Path | None = None,
             build_info: dict[str, Any] | None = None) -> web.Application:
    app = web.Application()
    app[SERVICE_KEY] = service
    app[SOCKETS_KEY] = {}
    app[STATE_KEY] = {"draining": False}
    started = time.time()
    build = {"package": "moshi-tui", "version": importlib.metadata.version("moshi-tui"),
             "python": platform.python_version(), **(build_info or {})}

    async def session(request: web.Request) -> web.StreamResponse:
        if app[STATE_KEY]["draining"]:
            raise web.HTTPServiceUnavailable(text="the server is shutting down\n")
        if not authorized(request, api_keys):
            log.info("%s refused: missing or wrong API key", peer_of(request))
            raise web.HTTPUnauthorized(text="a valid API key is needed: header %s or query ?%s=\n"
                                       % (wire.API_KEY_HEADER, wire.API_KEY_QUERY))
        peer = peer_of(request)
        refusal = service.refusal(request)
        if refusal is not None:
            log.info("%s refused: %s", peer, refusal)
            raise web.HTTPBadRequest(text=refusal + "\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        if request.transport is not None:
            sock = request.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        app[SOCKETS_KEY][ws] = request
        stats, begun = SessionStats(), time.monotonic()
        try:
            await service.handle(ws, request, stats)
        finally:
            app[SOCKETS_KEY].pop(ws, None)
            if app[STATE_KEY]["draining"]:
                await close(ws, request, WSCloseCode.GOING_AWAY, b"server shutting down")
            else:
                await close(ws, request)
            ended = "refused: no free slot" if stats.refused else (f"error: {stats.error}" if stats.error else "closed")
            log.info("%s %s %s duration=%.1fs frames=%d drops=%d %s", peer, service.model, service.path,
                     time.monotonic() - begun, stats.frames, stats.dropped, ended)
        return ws

    async def healthz(request: web.Request) -> web.Response:
        if app[STATE_KEY]["draining"]:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok", "free_slots": service.free_slots()})

    async def build_info(request: web.Request) -> web.Response:
        return web.json_response(build)

    async def modules_info(request: web.Request) -> web.Response:
        free = service.free_slots()
        entry = {"path": service.path, "model": service.model, "batch_size": service.slots,
                 "free_slots": free, "used_slots": service.slots - free, "uptime_s": round(time.time() - started), **service.info()}
        return web.json_response({service.path.rsplit("/", 1)[-1]: entry})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(service.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def on_startup(app: web.Application) -> None:
        await service.start()

    async def on_shutdown(app: web.Application) -> None:
        app[STATE_KEY]["draining"] = True
        await service.stop()
        await asyncio.gather(*(close(ws, request, WSCloseCode.GOING_AWAY, b"server shutting down")
                               for ws, request in list(app[SOCKETS_KEY].items())), return_exceptions=True)

    app.router.add_get(service.path, session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/build_info", build_info)
    app.router.add_get("/api/modules_info", modules_info)
    app.router.add_get("/metrics", metrics)
    if static_dir is not None:
        index = static_dir / "index.html"

        async def home(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        if index.is_file():
            app.router.add_get("/", home)
        app.router.add_static("/", static_dir)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


def ssl_context(folder: Path) -> ssl.SSLContext:
    """A server context from `folder`/cert.pem and `folder`/key.pem, as Kyutai's server reads them."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=folder / "cert.pem", keyfile=folder / "key.pem")
    return context


async def serve_until(app: web.Application, host: str, port: int, stop: asyncio.Event,
                      context: ssl.SSLContext | None = None) -> None:
    """Serve `app` until `stop` is set, then drain it (shutdown closes every session) and return."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context)
        await site.start()
        scheme = "wss" if context else "ws"
        log.info("serving %s at %s://%s:%d%s", app[SERVICE_KEY].model, scheme, host, port, app[SERVICE_KEY].path)
        await stop.wait()
    finally:
        await runner.cleanup()
