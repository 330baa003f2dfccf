"""Reaching a server (engine/remote/connect.py): the URL forms a user types, TLS checked or not, the
key in its header, and one-line errors; against a real aiohttp websocket server on loopback."""

import asyncio
import ssl
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from engine.remote.connect import RemoteError, Server, websocket_url, with_query
from engine.wire import API_KEY_HEADER, CHAT_PATH


@pytest.mark.parametrize("typed, url", [
    ("ws://127.0.0.1:8998", "ws://127.0.0.1:8998/api/chat"),
    ("wss://gpu.example.org", "wss://gpu.example.org/api/chat"),
    ("http://gpu:9000/", "ws://gpu:9000/api/chat"),
    ("https://gpu.example.org", "wss://gpu.example.org/api/chat"),
    ("HTTPS://gpu.example.org/moshi", "wss://gpu.example.org/moshi/api/chat"),  # behind a proxy's prefix
    ("ws://h:1/api/chat", "ws://h:1/api/chat"),
    ("ws://h:1/api/chat?auth_id=k", "ws://h:1/api/chat?auth_id=k"),
    ("localhost:8998", "ws://localhost:8998/api/chat"),
    ("gpu-box", "ws://gpu-box:8998/api/chat"),
    ("[::1]:9000", "ws://[::1]:9000/api/chat"),
    (" 10.0.0.2:8998 ", "ws://10.0.0.2:8998/api/chat"),
])
def test_the_forms_a_user_types_name_the_endpoint(typed, url):
    assert websocket_url(typed, CHAT_PATH) == url


@pytest.mark.parametrize("typed", ["", "ftp://h:1", "ws://", "ws://h:port", "h:70000", "ws://h:0", "ws://u@h:1",
                                   "ws://h:1/#x"])
def test_a_malformed_url_is_one_line(typed):
    with pytest.raises(RemoteError) as caught:
        websocket_url(typed, CHAT_PATH)
    assert "\n" not in str(caught.value) and "--url" in str(caught.value)


def test_query_parameters_are_added_and_the_users_own_kept():
    url = with_query("ws://h:1/api/chat?auth_id=k&text_topk=3", {"text_topk": 25, "text_temperature": 0.7,
                                                                 "audio_topk": None})
    assert url == "ws://h:1/api/chat?auth_id=k&text_topk=3&text_temperature=0.7"


def test_tls_options_are_checked_before_connecting(tmp_path):
    with pytest.raises(RemoteError, match="no such file"):
        Server.from_options("wss://h", CHAT_PATH, ca_cert=tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(RemoteError, match="not a PEM"):
        Server.from_options("wss://h", CHAT_PATH, ca_cert=tmp_path / "bad.pem")
    with pytest.raises(RemoteError, match="contradict"):
        Server.from_options("wss://h", CHAT_PATH, insecure=True, ca_cert=tmp_path / "bad.pem")
    with pytest.raises(RemoteError, match="goes with a TLS server"):
        Server.from_options("ws://h:1", CHAT_PATH, insecure=True)
    assert Server.from_options("https://h", CHAT_PATH).ssl.verify_mode == ssl.CERT_REQUIRED
    assert Server.from_options("h:1", CHAT_PATH).ssl is None


def test_the_key_is_in_no_repr_nor_shown_url():
    server = Server.from_options("ws://h:1/?auth_id=secret1", CHAT_PATH, api_key="secret2")
    assert "secret" not in repr(server) and "secret" not in server.shown
    assert server.headers == {API_KEY_HEADER: "secret2"}


async def _serve(tls_dir=None, key=None):
    """A websocket server on loopback that says what key it was shown, refusing others with 401."""
    async def chat(request):
        if key is not None and request.headers.get(API_KEY_HEADER) != key:
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(request.headers.get(API_KEY_HEADER, "-"))
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(CHAT_PATH, chat)
    runner = web.AppRunner(app)
    await runner.setup()
    context = None
    if tls_dir is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def _greeting(server):
    async with aiohttp.ClientSession() as session:
        ws = await server.connect(session)
        message = await ws.receive()
        await ws.close()
        return message.data


async def test_tls_is_verified_by_default_and_trusted_with_the_ca_file_or_insecure(tls_cert):
    runner, port = await _serve(tls_cert)
    try:
        with pytest.raises(RemoteError, match="not trusted.*--ca-cert FILE, or --insecure"):
            await _greeting(Server.from_options(f"wss://127.0.0.1:{port}", CHAT_PATH))
        assert await _greeting(Server.from_options(f"https://127.0.0.1:{port}", CHAT_PATH,
                                                   ca_cert=tls_cert / "cert.pem")) == "-"
        assert await _greeting(Server.from_options(f"wss://localhost:{port}", CHAT_PATH, insecure=True)) == "-"
    finally:
        await runner.cleanup()


async def test_the_key_goes_in_its_header_and_a_refusal_is_one_line():
    runner, port = await _serve(key="k1")
    try:
        assert await _greeting(Server.from_options(f"127.0.0.1:{port}", CHAT_PATH, api_key="k1")) == "k1"
        with pytest.raises(RemoteError, match="refused no key"):
            await _greeting(Server.from_options(f"127.0.0.1:{port}", CHAT_PATH))
        with pytest.raises(RemoteError, match="refused the key given: HTTP 401"):
            await _greeting(Server.from_options(f"127.0.0.1:{port}", CHAT_PATH, api_key="wrong"))
    finally:
        await runner.cleanup()


async def test_no_server_and_a_silent_one_are_one_line_each():
    runner, port = await _serve()
    await runner.cleanup()  # the port is free now: nobody listens
    with pytest.raises(RemoteError, match=f"cannot reach ws://127.0.0.1:{port}/api/chat"):
        await _greeting(Server.from_options(f"127.0.0.1:{port}", CHAT_PATH))
    # A server that accepts the connection and never answers the upgrade: a timeout, not a hang.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(RemoteError, match="cannot connect"):
                await Server.from_options(f"127.0.0.1:{port}", CHAT_PATH).connect(session, timeout=0.5)
    finally:
        silent.close()
