"""MqttTransport in a process holding more than FD_SETSIZE (1,024) descriptors.

paho's own network thread uses select(), which cannot watch a descriptor numbered
1024 or above: such a client never connected and reconnected forever, silently. The
transport's selector loop has no such limit; here every client's socket is numbered
above 1024.
"""

from __future__ import annotations

import os
import resource
import threading
import uuid
from collections.abc import Iterator

import pytest

from fogline.protocol import MqttMessage, MqttSettings, MqttTransport

HELD = 1100  # descriptors held open, so that every new socket gets a number >= 1024
CLIENTS = 4
WAIT = 15.0  # bounds a hang; times nothing


def _loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("paho-mqtt", "fogline-mqtt"))}


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HELD + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"hard RLIMIT_NOFILE {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    held: list[int] = []
    try:
        for _ in range(HELD):
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_transports_work_with_descriptors_above_fd_setsize(
    many_fds: None, mqtt_settings: MqttSettings
) -> None:
    before = _loop_threads()
    topic = f"test/{uuid.uuid4().hex[:10]}/fds"
    got: dict[str, list[bytes]] = {}
    done = threading.Condition()
    transports = [MqttTransport(mqtt_settings) for _ in range(CLIENTS)]
    try:
        for transport in transports:
            transport.connect(timeout=WAIT)
            sock = transport._client.socket()
            assert sock is not None and sock.fileno() >= 1024  # what select() cannot watch

            def handler(message: MqttMessage, name: str = transport.client_id) -> None:
                with done:
                    got.setdefault(name, []).append(message.payload)
                    done.notify_all()

            transport.subscribe(topic, handler, qos=1, wait=True)
        for i, transport in enumerate(transports):
            transport.publish(topic, b"m%d" % i, qos=1, wait=True)
        expected = sorted(b"m%d" % i for i in range(CLIENTS))
        with done:
            assert done.wait_for(
                lambda: all(sorted(got.get(t.client_id, [])) == expected for t in transports), WAIT
            ), got
        assert all(t.connected for t in transports)
    finally:
        for transport in transports:
            transport.close()
    assert not any(t.connected for t in transports)
    assert _loop_threads() == before
