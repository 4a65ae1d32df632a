"""Is a broker there? Free ports, a raw MQTT CONNECT probe and waiting for one."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable

__all__ = ["broker_answers", "free_port", "port_is_free", "wait_until_answers"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if an MQTT broker answers a CONNECT at host:port with a CONNACK.

    A refusal (e.g. "not authorized" from a broker that requires a password) still
    counts: a broker is there, and credentials are the real client's business.
    """
    # A random client id: a fixed one would kick out a concurrent probe (MQTT takeover).
    client_id = f"fogline-probe-{secrets.token_hex(6)}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    connect = bytes([0x10, len(body)]) + body  # 3.1.1, clean session; body < 128 bytes
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(connect)
            reply = b""
            while len(reply) < 4:
                part = sock.recv(4 - len(reply))
                if not part:
                    return False
                reply += part
            if reply[:2] != b"\x20\x02":
                return False
            if reply[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so no will and no error logged
            return True
    except OSError:
        return False


def port_is_free(host: str, port: int) -> bool:
    """True if we could listen on host:port (SO_REUSEADDR, as brokers use: a port in
    TIME_WAIT after a restart counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_answers(
    host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if broker_answers(host, port, timeout=0.5):
            return True
        time.sleep(0.05)
    return False
