"""The link emulator between simulated devices and a real Mosquitto."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fogline.firmware_sim import LinkEmulator, LinkProfile
from fogline.protocol import MqttMessage, MqttSettings, MqttTransport, Will


@pytest.fixture
def link(mqtt_settings: MqttSettings) -> Iterator[LinkEmulator]:
    emulator = LinkEmulator(mqtt_settings.host, mqtt_settings.port, seed=1)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


def _via(port: int) -> MqttSettings:
    return MqttSettings(url=f"mqtt://127.0.0.1:{port}", reconnect_min_s=0.1, reconnect_max_s=0.5)


def test_messages_cross_the_link_in_order_with_its_delay(
    link: LinkEmulator, mqtt_settings: MqttSettings
) -> None:
    port = link.add_device("dev-a", LinkProfile(rtt_ms=40.0, jitter_ms=5.0, loss=0.01))
    got: list[bytes] = []
    done = threading.Event()

    def on_message(msg: MqttMessage) -> None:
        got.append(msg.payload)
        if len(got) == 50:
            done.set()

    watcher = MqttTransport(mqtt_settings)
    device = MqttTransport(_via(port))
    try:
        watcher.connect()
        watcher.subscribe("sim-link-test/order", on_message)
        time.sleep(0.2)
        device.connect()
        for i in range(50):
            device.publish("sim-link-test/order", str(i).encode(), qos=1)
        assert done.wait(20)
    finally:
        device.close()
        watcher.close()
    assert got == [str(i).encode() for i in range(50)]
    state = link.state("dev-a")
    assert state.bytes_up > 0
    assert state.bytes_down > 0


def test_a_cut_link_fires_the_last_will_and_refuses_until_up(
    link: LinkEmulator, mqtt_settings: MqttSettings
) -> None:
    port = link.add_device("dev-b", LinkProfile())
    wills = threading.Event()
    topic = "sim-link-test/dev-b/state"

    def on_will(msg: MqttMessage) -> None:
        if msg.payload == b"offline":
            wills.set()

    watcher = MqttTransport(mqtt_settings)
    device = MqttTransport(_via(port), will=Will(topic, b"offline", retain=False))
    try:
        watcher.connect()
        watcher.subscribe(topic, on_will)
        device.connect()
        link.set_down("dev-b")
        assert wills.wait(10), "the broker did not publish the last will"
        time.sleep(0.5)
        assert not device.connected
        link.set_up("dev-b")
        assert device.wait_connected(10)
    finally:
        device.close()
        watcher.close()
    assert link.state("dev-b").aborted >= 2


def test_slow_link_and_restore(link: LinkEmulator) -> None:
    link.add_device("dev-c", LinkProfile(rtt_ms=10))
    link.set_slow("dev-c", extra_latency_ms=250.0, bandwidth_kbps=64.0)
    state = link.state("dev-c")
    assert state.extra_latency_ms == 250.0
    assert state.effective_bandwidth_kbps == 64.0
    link.restore("dev-c")
    assert state.extra_latency_ms == 0.0
    assert state.effective_bandwidth_kbps is None


def test_unknown_devices_are_refused(link: LinkEmulator) -> None:
    from fogline.protocol import FoglineError

    with pytest.raises(FoglineError, match="no simulated link"):
        link.set_down("nobody")
