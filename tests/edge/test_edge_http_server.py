"""The stdlib HTTP server under the v2 API: routing misses, methods, chunked bodies, HEAD,
and a stop that ends idle keep-alive connections and joins their threads."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from _release_kit import sample_input

from fogline.edge import Agent

HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0, "max_body_bytes": 64 * 1024}


def _served(agent_factory: Callable[..., Agent]) -> Agent:
    return agent_factory(http=HTTP)


def _raw(agent: Agent, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response (the server answers with Content-Length)."""
    assert agent.http_url is not None
    url = urlsplit(agent.http_url)
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 0), 10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            assert part, data
            data += part
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        size = int(headers.get("content-length", "0"))
        while len(body) < size and not request.startswith(b"HEAD"):
            part = sock.recv(65536)
            assert part
            body += part
    return int(lines[0].split()[1]), headers, body


def test_routing_misses_and_methods_get_json_errors(agent_factory: Callable[..., Agent]) -> None:
    agent = _served(agent_factory)
    status, headers, body = _raw(agent, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and "no route" in json.loads(body)["error"]
    assert headers["content-type"] == "application/json"
    status, _h, body = _raw(agent, b"DELETE /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "GET" in json.loads(body)["error"]
    status, _h, body = _raw(agent, b"GET /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "POST" in json.loads(body)["error"]
    status, headers, body = _raw(agent, b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""
    status, _h, body = _raw(agent, b"GET /v2?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["name"] == "fogline-edge"


def test_an_unread_chunked_body_is_discarded_and_the_server_stays_up(
    agent_factory: Callable[..., Agent],
) -> None:
    agent = _served(agent_factory)
    # No model is served: the route answers 404 before reading the body, and a body it
    # did not read is discarded so the connection stays in step.
    doc = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": sample_input().ravel().tolist(),
                }
            ]
        }
    ).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(doc), doc)
    status, _h, body = _raw(
        agent,
        b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
    )
    assert status == 404 and "not served" in json.loads(body)["error"]
    assert _raw(agent, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_stop_ends_idle_keep_alive_connections_and_joins_threads(
    agent_factory: Callable[..., Agent],
) -> None:
    before = set(threading.enumerate())
    agent = _served(agent_factory)
    assert agent.http_url is not None
    url = urlsplit(agent.http_url)
    socks = []
    for _ in range(3):  # idle keep-alive clients, each holding a server thread
        sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 0), 10)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        socks.append(sock)
    try:
        agent.stop()
        left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        assert left == [], left
        for sock in socks:
            assert sock.recv(10) == b""  # the server closed it
    finally:
        for sock in socks:
            sock.close()
