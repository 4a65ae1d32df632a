"""Transports made under ``sharing(LoopGroup(k))`` share network threads, k each: every
one keeps its own connection and messages, waits for acknowledgements as usual (off the
loop thread), refuses to wait on the shared thread, and the last to close stops it."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable

import pytest

from fogline.protocol import MqttMessage, MqttSettings, MqttTransport, TransportError
from fogline.protocol._mqtt_loop import LoopGroup, current_loop_group, sharing

WAIT = 15.0  # bounds a hang; times nothing


def _loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-shared")}


def test_transports_share_loops_and_each_gets_its_own_messages(
    mqtt_settings: MqttSettings,
) -> None:
    before = _loop_threads()
    group = LoopGroup(2, name="shared")
    base = f"test/{uuid.uuid4().hex[:10]}"
    with sharing(group):
        subs = [MqttTransport(mqtt_settings) for _ in range(5)]
    assert current_loop_group() is None  # only inside the context
    got: list[list[bytes]] = [[] for _ in subs]
    done = [threading.Event() for _ in subs]

    def collector(i: int) -> Callable[[MqttMessage], None]:
        def on(msg: MqttMessage) -> None:
            got[i].append(msg.payload)
            if len(got[i]) == 2:
                done[i].set()

        return on

    try:
        for sub in subs:
            sub.connect()
        assert group.loops == 3  # 2 + 2 + 1
        assert len(_loop_threads() - before) == 3
        for i, sub in enumerate(subs):
            sub.subscribe(f"{base}/{i}", collector(i), qos=1, wait=True)
        big = os.urandom(300_000)
        for i, sub in enumerate(subs):  # each publishes to the next: across loops
            target = f"{base}/{(i + 1) % len(subs)}"
            sub.publish(target, b"small %d" % i, qos=1, wait=True)
            sub.publish(target, big, qos=1, wait=True)
        for i in range(len(subs)):
            assert done[i].wait(WAIT), f"transport {i} got {len(got[i])} messages"
            sender = (i - 1) % len(subs)
            assert got[i] == [b"small %d" % sender, big]
        subs[0].close()
        assert group.loops == 3  # its loop still serves subs[1]
        subs[1].close()
        assert group.loops == 2
    finally:
        for sub in subs:
            sub.close()
    assert group.loops == 0
    assert _loop_threads() - before == set()


def test_a_shared_loop_thread_never_waits_for_acknowledgements(
    mqtt_settings: MqttSettings,
) -> None:
    group = LoopGroup(2, name="shared")
    topic = f"test/{uuid.uuid4().hex[:10]}/wait"
    errors: list[Exception] = []
    seen = threading.Event()
    with sharing(group):
        a, b = MqttTransport(mqtt_settings), MqttTransport(mqtt_settings)
    try:
        a.connect()
        b.connect()

        def on(_msg: MqttMessage) -> None:
            try:  # b's acknowledgement would be read by this very thread
                b.publish(f"{topic}/x", b"x", qos=1, wait=True)
            except TransportError as exc:
                errors.append(exc)
            seen.set()

        a.subscribe(topic, on, qos=1, wait=True)
        b.publish(topic, b"go", qos=1, wait=True)
        assert seen.wait(WAIT)
        assert len(errors) == 1
    finally:
        a.close()
        b.close()


def test_a_group_needs_room() -> None:
    with pytest.raises(ValueError):
        LoopGroup(0)
