"""The transport's BufferedSocket: one read serves several packets' bytes, and while a
large body is incomplete SO_RCVLOWAT holds wake-ups back, never beyond what the packet
still needs. Unit tests on a real loopback TCP pair, then whole messages through a real
Mosquitto."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from fogline.protocol import MqttMessage, MqttSettings, MqttTransport
from fogline.protocol._mqtt_loop import _LOWAT_MAX, _LOWAT_MIN, BufferedSocket

WAIT = 15.0  # bounds a hang; times nothing


@pytest.fixture
def tcp_pair() -> Iterator[tuple[BufferedSocket, socket.socket]]:
    """A non-blocking BufferedSocket and the peer that writes to it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    client.setblocking(False)
    reader = BufferedSocket(client)
    try:
        yield reader, peer
    finally:
        reader.close()
        peer.close()


def _lowat(reader: BufferedSocket) -> int:
    return int(reader.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))


def _recv_exactly(reader: BufferedSocket, size: int) -> bytes:
    """What paho does: ask for the rest until it is there (here: waiting when empty)."""
    got = b""
    while len(got) < size:
        try:
            got += reader.recv(size - len(got))
        except BlockingIOError:
            readable = _wait_readable(reader)
            assert readable, "no data within the bound"
    return got


def _wait_readable(reader: BufferedSocket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(reader, selectors.EVENT_READ)
        return bool(sel.select(WAIT))


def test_one_read_serves_several_small_reads(
    tcp_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    reader, peer = tcp_pair
    peer.sendall(b"\x40\x02\x00\x01" * 3)  # three PUBACK-sized packets
    assert _wait_readable(reader)
    assert reader.recv(1) == b"\x40"
    # The rest came in with the first read: served from the buffer, which the loop
    # drains because pending() says so (epoll cannot see it).
    assert reader.pending() == 11
    assert reader.recv(1) == b"\x02"
    assert reader.recv(2) == b"\x00\x01"
    assert reader.recv(100) == b"\x40\x02\x00\x01" * 2  # never more than there is
    assert reader.pending() == 0
    with pytest.raises(BlockingIOError):
        reader.recv(1)


def test_a_large_rest_waits_for_a_good_part_and_the_last_piece_is_never_held(
    tcp_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    reader, peer = tcp_pair
    body = os.urandom(3 * _LOWAT_MAX)
    peer.sendall(body[:1000])
    assert _wait_readable(reader)
    assert reader.recv(len(body)) == body[:1000]
    with pytest.raises(BlockingIOError):
        reader.recv(len(body) - 1000)
    # paho waits for the rest of a large body: wake us for a good part of it only.
    assert _lowat(reader) == _LOWAT_MAX
    peer.sendall(body[1000:])
    rest = _recv_exactly(reader, len(body) - 1000)
    assert rest == body[1000:]
    assert _lowat(reader) == 1  # the packet is complete: small packets wake us again


def test_the_threshold_shrinks_with_the_rest(
    tcp_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    reader, peer = tcp_pair
    size = _LOWAT_MAX + 2 * _LOWAT_MIN
    body = os.urandom(size)
    with pytest.raises(BlockingIOError):
        reader.recv(size)
    assert _lowat(reader) == _LOWAT_MAX
    peer.sendall(body[: size - _LOWAT_MIN])
    assert _recv_exactly(reader, size - _LOWAT_MIN) == body[: size - _LOWAT_MIN]
    # Less than the threshold is left: it must not wait for bytes that never come.
    assert _lowat(reader) == 1
    with pytest.raises(BlockingIOError):
        reader.recv(_LOWAT_MIN)
    assert _lowat(reader) == _LOWAT_MIN
    peer.sendall(body[size - _LOWAT_MIN :])
    assert _recv_exactly(reader, _LOWAT_MIN) == body[size - _LOWAT_MIN :]
    assert _lowat(reader) == 1


def test_a_large_body_is_received_into_its_buffer_after_what_was_buffered(
    tcp_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    """paho's reader (the transport's) takes a large body with recv_into: first the
    bytes an earlier read brought in, then straight from the socket, with the same
    wake-up threshold as recv, which never waits beyond the body's end."""
    reader, peer = tcp_pair
    body = os.urandom(2 * _LOWAT_MAX)
    peer.sendall(b"\x30" + body[:5000])
    assert _wait_readable(reader)
    assert reader.recv(1) == b"\x30"  # the header's read brought part of the body in
    target = bytearray(len(body))
    filled = 0
    with memoryview(target) as view:
        filled += reader.recv_into(view[filled:])
        assert filled == 5000 and reader.pending() == 0
        with pytest.raises(BlockingIOError):
            reader.recv_into(view[filled:])
        assert _lowat(reader) == _LOWAT_MAX
        peer.sendall(body[5000:] + b"\x40\x02\x00\x01")  # and the next packet behind
        while filled < len(body):
            try:
                filled += reader.recv_into(view[filled:])
            except BlockingIOError:
                assert _wait_readable(reader), "no data within the bound"
    assert bytes(target) == body
    assert _lowat(reader) == 1
    assert _recv_exactly(reader, 4) == b"\x40\x02\x00\x01"  # nothing read beyond it


def test_small_rests_are_read_as_they_come(
    tcp_pair: tuple[BufferedSocket, socket.socket],
) -> None:
    reader, _peer = tcp_pair
    with pytest.raises(BlockingIOError):
        reader.recv(_LOWAT_MIN - 1)
    assert _lowat(reader) == 1


def test_large_and_small_messages_interleaved_arrive_whole_and_in_order(
    mqtt_settings: MqttSettings,
) -> None:
    topic = f"test/{uuid.uuid4().hex[:10]}/mixed"
    payloads = [
        os.urandom(size)
        for size in [1 << 20, 3, 200_000, 1, 1 << 20, 70_000, 5, 5, 5, (1 << 20) + 17, 9]
    ]
    got: list[bytes] = []
    done = threading.Event()

    def collect(msg: MqttMessage) -> None:
        got.append(msg.payload)
        if len(got) == len(payloads):
            done.set()

    with MqttTransport(mqtt_settings) as sub, MqttTransport(mqtt_settings) as pub:
        sub.subscribe(topic, collect, qos=1, wait=True)
        for payload in payloads:
            pub.publish(topic, payload, qos=1)
        assert done.wait(WAIT), f"{len(got)} of {len(payloads)} messages arrived"
        sock = sub._client.socket()
        assert isinstance(sock, BufferedSocket)
    assert got == payloads


def test_input_backlog_counts_what_the_network_thread_has_not_read(
    mqtt_settings: MqttSettings,
) -> None:
    topic = f"test/{uuid.uuid4().hex[:10]}/backlog"
    entered, release = threading.Event(), threading.Event()

    def stall(_msg: MqttMessage) -> None:  # holds the network thread on the first message
        entered.set()
        release.wait(WAIT)

    with MqttTransport(mqtt_settings) as sub, MqttTransport(mqtt_settings) as pub:
        assert sub.input_backlog() == 0
        sub.subscribe(topic, stall, qos=0, wait=True)
        pub.publish(topic, b"first", qos=1, wait=True)
        assert entered.wait(WAIT)
        pub.publish(topic, os.urandom(50_000), qos=1, wait=True)  # arrives, unread
        backlog = 0
        deadline = threading.Event()
        for _ in range(int(WAIT / 0.01)):
            backlog = sub.input_backlog()
            if backlog > 0:
                break
            deadline.wait(0.01)
        release.set()
        assert backlog > 0
    assert MqttTransport(mqtt_settings).input_backlog() == 0  # never connected


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_large_publishes_keep_topic_flags_and_are_acknowledged(
    mqtt_settings: MqttSettings, protocol: str
) -> None:
    """Large PUBLISH packets are taken apart in place (one payload copy) under MQTT
    3.1.1 and by paho otherwise: the same messages either way. 25 QoS 1 messages, more
    than Mosquitto sends unacknowledged, so each must have been acknowledged."""
    settings = mqtt_settings.model_copy(update={"protocol": protocol})
    base = f"test/{uuid.uuid4().hex[:10]}"
    retained = os.urandom(100_000)
    live = [os.urandom(70_000 + i) for i in range(25)]
    got: list[MqttMessage] = []
    done = threading.Event()

    def collect(msg: MqttMessage) -> None:
        got.append(msg)
        if len(got) == 1 + len(live):
            done.set()

    with MqttTransport(settings) as sub, MqttTransport(settings) as pub:
        pub.publish(f"{base}/kept/é", retained, qos=1, retain=True, wait=True)
        sub.subscribe(f"{base}/#", collect, qos=1, wait=True)
        for i, payload in enumerate(live):
            pub.publish(f"{base}/live", payload, qos=i % 2)
        assert done.wait(WAIT), f"{len(got)} of {1 + len(live)} messages arrived"
        pub.publish(f"{base}/kept/é", b"", qos=1, retain=True, wait=True)
    first, rest = got[0], got[1 : 1 + len(live)]  # not the clearing of the retained one
    assert (first.topic, first.payload, first.qos, first.retain) == (
        f"{base}/kept/é",
        retained,
        1,
        True,
    )
    assert [m.payload for m in rest] == live
    assert [m.qos for m in rest] == [i % 2 for i in range(len(live))]
    assert {m.topic for m in rest} == {f"{base}/live"} and not any(m.retain for m in rest)
