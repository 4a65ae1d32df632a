"""The fleet monitor against a real Mosquitto, on real SQLite files and a real
PostgreSQL (tests taking ``fleet_store`` or ``open_store`` run on both)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from fogline.cloud.fleet import FleetMonitor, FleetStore, summarize
from fogline.protocol import (
    MqttSettings,
    MqttTransport,
    Topics,
    encode,
)

StartMonitor = Callable[..., FleetMonitor]
OpenStore = Callable[..., FleetStore]
Wait = Callable[..., None]


def test_ingest_builds_the_registry_and_summary(
    fleet_store: FleetStore,
    start_monitor: StartMonitor,
    devices: Any,
    wait: Wait,
) -> None:
    monitor = start_monitor(fleet_store, heartbeat_interval_s=30.0)
    devices.state("dev-a", device_class="rpi4", groups=["lab"], agent_version="0.1.0")
    devices.state("dev-b", device_class="jetson-like")
    wait(lambda: len(fleet_store.devices()) == 2, what="two devices registered")
    devices.heartbeat(
        "dev-a",
        groups=["lab"],
        requests=10,
        edge_requests=8,
        cloud_requests=2,
        latency_p50_ms=5.0,
        latency_p99_ms=20.0,
        models={"digits": 2},
    )
    devices.heartbeat(
        "dev-a",
        groups=["lab"],
        requests=30,
        edge_requests=24,
        cloud_requests=6,
        budgeted_requests=30,
        met_budget=27,
        uptime_s=3.0,
        seq=3,
        latency_p50_ms=6.0,
        latency_p99_ms=22.0,
        models={"digits": 2},
    )
    devices.heartbeat(
        "dev-b",
        device_class="jetson-like",
        requests=10,
        edge_requests=10,
        errors=1,
        latency_p50_ms=2.0,
        latency_p99_ms=9.0,
    )
    devices.event("dev-a", "install_succeeded", model="digits", version=2)
    wait(lambda: sum(d.heartbeats for d in fleet_store.devices()) == 3, what="3 heartbeats")
    wait(lambda: len(fleet_store.events("dev-a")) == 1, what="the event")

    a = fleet_store.device("dev-a")
    assert a.online and a.groups == ["lab"] and a.agent_version == "0.1.0"
    assert a.heartbeat is not None and a.heartbeat.models == {"digits": 2}
    assert a.totals.requests == 30 and a.recent is not None and a.recent.requests == 20
    assert a.recent.seconds == pytest.approx(2.0)
    [event] = fleet_store.events("dev-a")
    assert (event.kind, event.model, event.version) == ("install_succeeded", "digits", 2)

    s = summarize(fleet_store.devices())
    assert (s.devices_total, s.devices_online, s.devices_offline) == (2, 2, 0)
    assert s.requests_total == 40 and s.errors_total == 1
    assert s.offload_ratio == pytest.approx(6 / 40)
    assert s.met_budget_share == pytest.approx(27 / 30)
    assert s.latency_p50_ms == pytest.approx(4.0) and s.latency_p99_ms == 22.0
    [model] = s.models
    assert (model.model, model.latest_version, model.versions) == ("digits", 2, {1: 1, 2: 1})
    flagged = {a.device_id: a.reasons for a in s.attention}
    assert flagged == {"dev-b": ["errors_rising", "version_behind"]}
    assert monitor.stats().rejected == {}


def test_malformed_telemetry_is_counted_and_ignored(
    fleet_store: FleetStore,
    start_monitor: StartMonitor,
    devices: Any,
    topics: Topics,
    heartbeat_factory: Callable[..., object],
    wait: Wait,
) -> None:
    monitor = start_monitor(fleet_store, heartbeat_interval_s=30.0)
    devices.state("good")
    wait(lambda: len(fleet_store.devices()) == 1, what="device registered")
    good_hb = encode(heartbeat_factory("good"))
    envelope = msgpack.unpackb(good_hb)
    envelope["body"]["latency_p99_ms"] = math.nan
    nan_hb = msgpack.packb(envelope)
    envelope["body"]["latency_p99_ms"] = 1.0
    envelope["body"]["surprise"] = 1
    extra_field = msgpack.packb(envelope)
    hb_topic = topics.heartbeat("good")
    bad: list[tuple[str, bytes]] = [
        (hb_topic, b"\x00garbage\xff"),
        (hb_topic, b""),
        (hb_topic, nan_hb),
        (hb_topic, extra_field),
        (hb_topic, encode(heartbeat_factory("other"))),  # someone else's heartbeat
        (hb_topic, encode(devices_state_message())),  # a state on a heartbeat topic
        (topics.events("good"), encode(heartbeat_factory("good"))),
        (f"{topics.prefix}/devices/-bad/heartbeat", encode(heartbeat_factory("good"))),
    ]
    for topic, payload in bad:
        devices.publish(topic, payload)
    devices.heartbeat("good", requests=5, edge_requests=5)  # still lands after the junk
    wait(lambda: fleet_store.device("good").heartbeats == 1, what="good heartbeat")
    assert monitor.flush()
    stats = monitor.stats()
    assert stats.rejected == {
        "decode_error": 4,
        "wrong_type": 2,
        "device_mismatch": 1,
        "bad_topic": 1,
    }
    assert stats.received == {"state": 1, "heartbeat": 8, "events": 1}
    assert [d.device_id for d in fleet_store.devices()] == ["good"]
    assert fleet_store.device("good").totals.requests == 5
    assert monitor.connected


def devices_state_message() -> object:
    from fogline.protocol import DeviceState

    return DeviceState(device_id="good", status="online", at=1.0)


def test_missed_heartbeats_mark_offline_and_a_heartbeat_brings_it_back(
    fleet_store: FleetStore,
    start_monitor: StartMonitor,
    devices: Any,
    wait: Wait,
) -> None:
    start_monitor(fleet_store, heartbeat_interval_s=0.2, missed_heartbeats=2)
    # Retained states reach a monitor whenever it subscribes: once they are in, the
    # heartbeat subscription (same SUBSCRIBE packet) is active too.
    devices.state("quiet")
    devices.state("chatty")
    wait(lambda: len(fleet_store.devices()) == 2, what="registered")
    devices.heartbeat("quiet", interval_s=0.2)
    devices.heartbeat("chatty", interval_s=5.0)
    wait(lambda: fleet_store.device("chatty").heartbeats == 1, what="heartbeats")
    wait(lambda: not fleet_store.device("quiet").online, what="quiet offline")
    quiet = fleet_store.device("quiet")
    assert quiet.status_reason == "missed_heartbeats"
    assert fleet_store.device("chatty").online  # its own 5 s interval still holds
    devices.heartbeat("quiet", interval_s=0.2, uptime_s=50.0)
    wait(lambda: fleet_store.device("quiet").online, what="quiet back online")
    assert fleet_store.device("quiet").status_reason == "heartbeat"


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from fogline.protocol import (DeviceState, MqttSettings, MqttTransport, Topics, Will,
                                  encode)
    url, prefix, device = sys.argv[1:4]
    topics = Topics(prefix)
    offline = DeviceState(device_id=device, status="offline", at=time.time())
    t = MqttTransport(MqttSettings(url=url, keepalive_s=5), client_id=device,
                      will=Will(topics.device_state(device), encode(offline)))
    t.connect()
    online = DeviceState(device_id=device, status="online", at=time.time())
    t.publish(topics.device_state(device), encode(online), qos=1, retain=True, wait=True)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while True:
        time.sleep(1)
    """
)


def _spawn_device(url: str, prefix: str, device: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _DEVICE_SCRIPT, url, prefix, device],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_last_will_marks_offline_and_restart_brings_it_back(
    fleet_store: FleetStore,
    start_monitor: StartMonitor,
    broker_url: str,
    topics: Topics,
    wait: Wait,
) -> None:
    # A long heartbeat interval: only the last will can explain going offline quickly.
    start_monitor(fleet_store, heartbeat_interval_s=60.0)
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_spawn_device(broker_url, topics.prefix, "willing"))
        wait(lambda: [d.online for d in fleet_store.devices()] == [True], what="online")
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        wait(lambda: not fleet_store.device("willing").online, what="offline by last will")
        assert fleet_store.device("willing").status_reason == "last_will"
        procs.append(_spawn_device(broker_url, topics.prefix, "willing"))
        wait(lambda: fleet_store.device("willing").online, what="online after restart")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def test_registry_survives_a_monitor_restart(
    open_store: OpenStore,
    start_monitor: StartMonitor,
    devices: Any,
    wait: Wait,
) -> None:
    store = open_store()
    try:
        monitor = start_monitor(store, heartbeat_interval_s=30.0)
        devices.state("keeper")
        wait(lambda: len(store.devices()) == 1, what="registered")
        devices.heartbeat("keeper", requests=7, edge_requests=7)
        devices.event("keeper", "agent_started")
        wait(lambda: len(store.events("keeper")) == 1, what="event stored")
        monitor.close()
    finally:
        store.close()
    first = open_store(readonly=True)
    try:
        before = first.device("keeper")
    finally:
        first.close()
    store = open_store()
    try:
        monitor = start_monitor(store, heartbeat_interval_s=30.0)
        wait(lambda: monitor.stats().received.get("state") == 1, what="retained state")
        assert monitor.flush()
        again = store.device("keeper")
        assert (
            again.model_copy(
                update={"last_seen": before.last_seen, "last_alive_at": before.last_alive_at}
            )
            == before
        )
        devices.heartbeat("keeper", requests=9, edge_requests=9, uptime_s=10.0)
        wait(lambda: store.device("keeper").heartbeats == 2, what="second heartbeat")
        after = store.device("keeper")
        assert after.first_seen == before.first_seen
        assert after.totals.requests == 9 and len(store.events("keeper")) == 1
    finally:
        monitor.close()
        store.close()


def test_shared_subscription_replicas_split_the_load(
    open_store: OpenStore,
    start_monitor: StartMonitor,
    devices: Any,
    wait: Wait,
) -> None:
    stores = [open_store(), open_store()]
    try:
        replicas = [
            start_monitor(s, heartbeat_interval_s=30.0, shared_group="fleet") for s in stores
        ]
        names = [f"dev-{i:02d}" for i in range(10)]
        for name in names:
            devices.state(name)
        wait(
            lambda: all(r.stats().received.get("state") == 10 for r in replicas),
            what="every replica has the retained states",
        )
        for round_ in range(1, 11):
            for name in names:
                devices.heartbeat(
                    name,
                    requests=round_,
                    edge_requests=round_,
                    uptime_s=float(round_),
                    at=1_700_000_000.0 + round_,
                )
        wait(
            lambda: sum(r.stats().received.get("heartbeat", 0) for r in replicas) == 100,
            what="all heartbeats received",
        )
        assert all(r.flush() for r in replicas)
        received = [r.stats().received.get("heartbeat", 0) for r in replicas]
        assert all(n > 0 for n in received), received  # each did a part...
        rows = stores[0].devices()
        assert len(rows) == 10
        assert sum(d.heartbeats for d in rows) == 100  # ...and together all
        assert [d.totals.requests for d in rows] == [10] * 10
    finally:
        for s in stores:
            s.close()


def test_monitor_with_a_shared_transport_leaves_it_open(
    fleet_store: FleetStore,
    mqtt_settings: MqttSettings,
    topics: Topics,
    devices: Any,
    wait: Wait,
) -> None:
    transport = MqttTransport(mqtt_settings)
    transport.connect()
    try:
        with FleetMonitor(transport, fleet_store, topics, heartbeat_interval_s=30.0) as monitor:
            devices.state("shared-t")
            wait(lambda: len(fleet_store.devices()) == 1, what="registered")
            devices.heartbeat("shared-t")
            wait(lambda: fleet_store.device("shared-t").heartbeats == 1, what="heartbeat")
            assert monitor.flush()
        assert transport.connected
    finally:
        transport.close()
