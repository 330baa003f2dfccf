"""Reaching a model server: its URL, TLS and key, checked before anything connects.

Every remote client (a conversation over ``/api/chat``, a transcription over ``/api/asr-streaming``)
builds a `Server` from what the user typed, then opens its websocket with `Server.connect`. Torch-free;
aiohttp is imported only when a connection is opened.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import EngineError
from ..wire import API_KEY_HEADER, DEFAULT_PORT

if TYPE_CHECKING:
    import aiohttp

# What a user may type: the scheme he wrote, and the websocket scheme it stands for.
SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
CONNECT_TIMEOUT_S = 10.0


class RemoteError(EngineError):
    """A server that cannot be reached, refuses us, or breaks the protocol: one line for the user."""


def websocket_url(url: str, path: str) -> str:
    """The websocket URL of endpoint `path` on the server the user named: ``ws://``, ``wss://``,
    ``http://`` or ``https://`` (the same server, its websocket scheme), or a bare ``host[:port]``
    (``ws://``, port 8998). A URL's own path is a prefix (a server behind a proxy), unless it
    already ends with the endpoint. Its query string is kept."""
    text = url.strip()
    if not text:
        raise RemoteError("--url is empty: give ws://HOST:PORT, wss://HOST, http(s)://HOST or HOST:PORT")
    if "://" not in text:
        text = "ws://" + text
        bare = True
    else:
        bare = False
    parts = urlsplit(text)
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise RemoteError(f"--url {url}: the scheme must be ws, wss, http or https, not {parts.scheme!r}")
    try:
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        raise RemoteError(f"--url {url}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or port == 0 or parts.username is not None or parts.fragment:
        raise RemoteError(f"--url {url}: not a server address (ws://HOST:PORT, wss://HOST, http(s)://HOST or HOST:PORT)")
    netloc = parts.netloc if port is not None or not bare else f"{parts.netloc}:{DEFAULT_PORT}"
    prefix = parts.path.rstrip("/")
    full = prefix if prefix.endswith(path) else prefix + path
    return urlunsplit((scheme, netloc, full, parts.query, ""))


def with_query(url: str, params: dict[str, object]) -> str:
    """`url` with `params` added to its query string (those it already has keep their value)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for name, value in params.items():
        if value is not None:
            query.setdefault(name, str(value))
    return urlunsplit(parts._replace(query=urlencode(query)))


def ssl_context(insecure: bool, ca_cert: Path | None) -> ssl.SSLContext:
    """Verify the server's certificate (against the system's authorities, or `ca_cert`'s), or,
    `insecure`, take any certificate (a self-signed one of a test box)."""
    if insecure and ca_cert is not None:
        raise RemoteError("--insecure and --ca-cert contradict each other: verify against the file, or not at all")
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_cert is None:
        return ssl.create_default_context()
    if not ca_cert.is_file():
        raise RemoteError(f"--ca-cert {ca_cert}: no such file")
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, OSError) as exc:
        raise RemoteError(f"--ca-cert {ca_cert}: not a PEM certificate file ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class Server:
    """A server endpoint, checked: its websocket URL, the TLS context for wss, the key to show."""

    url: str
    ssl: ssl.SSLContext | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # never in a log or a repr

    @classmethod
    def from_options(cls, url: str, path: str, api_key: str | None = None, insecure: bool = False,
                     ca_cert: Path | None = None) -> Server:
        """What the user typed, checked now: a malformed URL or a missing CA file is one line."""
        ws_url = websocket_url(url, path)
        secure = ws_url.startswith("wss:")
        if not secure and (insecure or ca_cert is not None):
            option = "--insecure" if insecure else "--ca-cert"
            raise RemoteError(f"{option} goes with a TLS server (wss:// or https://), not {ws_url}")
        context = ssl_context(insecure, ca_cert) if secure else None
        return cls(ws_url, context, api_key or None)

    def __repr__(self) -> str:
        return f"Server({self.shown!r})"

    @property
    def shown(self) -> str:
        """The URL to show the user: without its query string, where a key may be."""
        return urlunsplit(urlsplit(self.url)._replace(query=""))

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.api_key is None else {API_KEY_HEADER: self.api_key}

    async def connect(self, session: aiohttp.ClientSession, query: dict[str, object] | None = None,
                      timeout: float = CONNECT_TIMEOUT_S) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket (with `query` added to the URL); a failure is a one-line `RemoteError`."""
        import aiohttp

        url = with_query(self.url, query or {})
        try:
            # The whole opening (TCP, TLS, HTTP upgrade) within `timeout`: a black-holed address fails, not hangs.
            return await asyncio.wait_for(
                session.ws_connect(url, headers=self.headers, ssl=self.ssl or True, max_msg_size=0,
                                   timeout=aiohttp.ClientWSTimeout(ws_close=1.0)), timeout)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                key = "no key (--api-key or MOSHI_API_KEY)" if self.api_key is None else "the key given"
                raise RemoteError(f"{self.shown} refused {key}: HTTP {exc.status}") from None
            if exc.status == 400:
                raise RemoteError(f"{self.shown} refused the settings asked for (HTTP 400): the sampling "
                                  "options given with --url") from None
            raise RemoteError(f"{self.shown} is not a websocket endpoint here: HTTP {exc.status} {exc.message}") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise RemoteError(f"{self.shown}: the server's certificate is not trusted ({exc.certificate_error}); "
                              "give its authority with --ca-cert FILE, or --insecure to skip the check") from None
        except aiohttp.ClientConnectorError as exc:
            raise RemoteError(f"cannot reach {self.shown}: {exc.strerror or exc.os_error}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RemoteError(f"cannot connect to {self.shown}: {type(exc).__name__} {exc}".rstrip()) from None

