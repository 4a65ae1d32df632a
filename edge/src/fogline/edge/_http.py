"""The local HTTP API's server: :class:`~._v2api.V2Api` on the standard library
(``socketserver`` + ``http.server``'s request parsing), one thread per keep-alive
connection; inference runs on that thread.

Starlette and uvicorn served it before: the stdlib stack costs ~6 MB less resident
memory on the device (no asyncio, anyio, h11 or threadpool) and is no slower (see the
footprint section of docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fogline.protocol import ConfigError, FoglineError

from ._config import HttpConfig
from ._v2api import HttpError, V2Api, json_reply, status_of

if TYPE_CHECKING:
    from ._agent import Agent

__all__ = ["HttpServer"]

log = logging.getLogger("fogline.edge.http")

# An idle keep-alive connection closes after this long (uvicorn's default), so its
# thread does not linger.
_IDLE_TIMEOUT_S = 5.0
_JOIN_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    """One keep-alive connection. ``http.server`` parses the request line and headers
    (and answers ``Expect: 100-continue``); routing and replies are ours."""

    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    server: _Server
    _body_read: bool

    def setup(self) -> None:
        super().setup()
        # Replies go out in one write, but a client's next request must not wait on
        # Nagle + delayed ACK (~40 ms per keep-alive request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_body(self, limit: int) -> bytes:
        self._body_read = True
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked(limit)
        declared = self.headers.get("content-length")
        if declared is None:
            return b""
        if not declared.isdigit():
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {declared!r}")
        size = int(declared)
        if size > limit:
            self.close_connection = True  # the body stays unread
            raise HttpError(413, f"request body of {declared} bytes is over the limit of {limit}")
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise HttpError(400, "the request body ended early")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                length = int(line, 16)
            except ValueError:
                self.close_connection = True
                raise HttpError(400, "malformed chunked body") from None
            if length == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            size += length
            if size > limit:
                self.close_connection = True
                raise HttpError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(self.rfile.read(length))
            self.rfile.readline(1024)

    def _serve(self) -> None:
        self._body_read = False
        path = unquote(self.path.split("?", 1)[0])
        try:
            status, body, ctype, headers = self.server.api.route(self, self.command, path)
        except HttpError as exc:
            status, body, ctype, headers = json_reply({"error": exc.message}, exc.status)
        except FoglineError as exc:
            code, extra = status_of(exc)
            status, body, ctype, headers = json_reply({"error": exc.message}, code, extra)
        except Exception as exc:
            log.exception("unexpected error serving %s", path)
            status, body, ctype, headers = json_reply(
                {"error": f"internal error: {type(exc).__name__}"}, 500
            )
        if not self._body_read:
            self._discard_body()
        self._write(status, body, ctype, headers)

    def _discard_body(self) -> None:
        """Keep the connection in step when a route answered without reading a body."""
        declared = self.headers.get("content-length", "0")
        if "chunked" in self.headers.get("transfer-encoding", "").lower() or not (
            declared.isdigit() and int(declared) <= self.server.api.config.max_body_bytes
        ):
            self.close_connection = True
        elif declared != "0":
            self.rfile.read(int(declared))

    def _write(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None) -> None:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"content-type: {ctype}",
            f"content-length: {len(body)}",
        ]
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        if self.close_connection:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.address_string(), *args)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection; :meth:`close` ends the connections and joins them."""

    allow_reuse_address = True
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False

    def __init__(self, family: socket.AddressFamily, api: V2Api) -> None:
        self.address_family = family
        self.api = api
        self._lock = threading.Lock()
        self._live: dict[threading.Thread, socket.socket] = {}
        super().__init__((api.config.host, api.config.port), _Handler, bind_and_activate=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._connection,
            args=(request, client_address),
            name="fogline-http-conn",
            daemon=True,
        )
        with self._lock:
            self._live[thread] = request
        thread.start()

    def _connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._live.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-reply is routine, not a traceback on stderr.
        log.debug("connection from %s failed", client_address, exc_info=True)

    def close(self) -> None:
        self.server_close()
        with self._lock:
            live = list(self._live.items())
        for _thread, sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on recv
        for thread, _sock in live:
            thread.join(timeout=_JOIN_TIMEOUT_S)


class HttpServer:
    """The API on a thread, bound before it starts so ``port = 0`` is known at once."""

    def __init__(self, agent: Agent, config: HttpConfig) -> None:
        self._config = config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._server = _Server(family, V2Api(agent, config))
        try:
            self._server.server_bind()
            self._server.server_activate()
        except OSError as exc:
            self._server.server_close()
            raise ConfigError(
                f"config field 'http.port': cannot bind {config.host}:{config.port}: {exc}"
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self._config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="fogline-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()  # returns once serve_forever has
            self._thread.join(timeout=_JOIN_TIMEOUT_S)
            self._thread = None
        self._server.close()
