"""The local control channel of a running simulation (``fogline-sim fault ...``).

A running fleet listens on a loopback TCP port and writes ``control.json`` (host, port,
pid) into its data root; ``fogline-sim fault`` reads that file and sends one JSON line,
getting one JSON line back. Requests::

    {"op": "fault", "kind": "kill", "device": "sim-0003", "duration_s": 5.0}
    {"op": "devices"}

A plain socket rather than MQTT because a fault must work when the broker or the
device's link is exactly what is broken. It binds to 127.0.0.1 only: any local user may
inject faults into a simulator, which is what a simulator is for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fogline.protocol import ConfigError, FoglineError, TransportError

__all__ = ["CONTROL_FILE", "ControlServer", "send_control"]

log = logging.getLogger("fogline.firmware_sim.control")

CONTROL_FILE = "control.json"
_MAX_LINE = 64 * 1024

ControlHandler = Callable[[dict[str, Any]], dict[str, Any]]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    handle_request_fn: ControlHandler


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(_MAX_LINE)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            reply = self.server.handle_request_fn(request)
        except ValueError as exc:
            reply = _error("bad_request", f"not a valid request: {exc}")
        except FoglineError as exc:
            reply = _error(exc.code, exc.message)
        except Exception as exc:  # keep the simulation running whatever a client sends
            log.exception("control request failed")
            reply = _error("internal_error", f"{type(exc).__name__}: {exc}")
        self.wfile.write(json.dumps(reply).encode() + b"\n")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


class ControlServer:
    """Serve ``handler`` on a loopback port and advertise it in ``data_root/control.json``."""

    def __init__(self, data_root: Path, handler: ControlHandler) -> None:
        self.data_root = data_root
        self._handler = handler
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        server = _Server(("127.0.0.1", 0), _RequestHandler)
        server.handle_request_fn = self._handler
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="fogline-sim-control"
        )
        self._thread.daemon = True
        self._thread.start()
        host, port = self.address or ("127.0.0.1", 0)
        info = {"host": host, "port": port, "pid": os.getpid()}
        self.data_root.mkdir(parents=True, exist_ok=True)
        tmp = self.data_root / (CONTROL_FILE + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.data_root / CONTROL_FILE)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with contextlib.suppress(OSError):
            (self.data_root / CONTROL_FILE).unlink()


def send_control(data_root: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the simulation running in ``data_root``; returns its reply.

    Raises :class:`ConfigError` when no simulation runs there and
    :class:`TransportError` when it does not answer.
    """
    path = data_root / CONTROL_FILE
    try:
        info = json.loads(path.read_text())
        address = (str(info["host"]), int(info["port"]))
    except FileNotFoundError:
        raise ConfigError(f"no running simulation in {data_root} (no {CONTROL_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable control file: {exc}") from None
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as fh:
                line = fh.readline(_MAX_LINE)
    except OSError as exc:
        where = f"{address[0]}:{address[1]}"
        raise TransportError(f"simulation at {where} did not answer: {exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise TransportError("simulation sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise TransportError("simulation sent a reply that is not a JSON object")
    return reply
