"""``fogline keys rotate`` and ``retire`` on a live fleet of real agents.

Real Mosquitto, the cloud's registry and artifact service, and three real agents, one of
them killed during the rotation: the live agents adopt the new key at once, the killed
one walks the retained trust chain when it comes back, retiring the old key is refused
until every device trusts its successor, releases signed by the new key install, and a
release signed by the retired key is refused while the installed model keeps serving.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit
sys.path.insert(0, str(Path(__file__).parent))  # for _cli_fleet

from _cli_fleet import MODEL, Cloud

from fogline.cloud import build_manifest, load_signing_key
from fogline.protocol import (
    DeviceEvent,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    Topics,
    decode,
    encode,
    sign_release,
)


def key_sets(cloud: Cloud) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for profile, device_id in cloud.ids.items():
        agent = cloud.fleet.device(device_id).agent
        out[profile] = None if agent is None else agent.key_set_version
    return out


def wait_until(predicate: object, timeout: float = 30.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.mark.slow
def test_rotate_then_retire_on_a_live_fleet(cli_fleet: Cloud, mqtt_settings: MqttSettings) -> None:
    cloud = cli_fleet
    v1 = cloud.register(1)
    assert cloud.publish(f"{MODEL}:{v1}", "--wait", "--timeout", "60")[0] == 0
    old_key = load_signing_key(cloud.data_dir)
    code, shown = cloud.cli("keys", "show")
    assert code == 0 and shown["key_set_version"] == 0 and shown["key_id"] == old_key.key_id

    victim = cloud.ids["rpi4"]
    assert cloud.fleet.inject("kill", victim).ok

    code, rotated = cloud.cli("keys", "rotate")
    assert code == 0, rotated
    assert rotated["key_set_version"] == 1 and rotated["active_key_id"] != old_key.key_id
    assert rotated["resigned_releases"] == [f"{MODEL}:{v1}"] and rotated["published"]
    new_id = rotated["active_key_id"]
    live = ("jetson-like", "mcu-gateway")
    assert wait_until(lambda: all(key_sets(cloud)[p] == 1 for p in live)), key_sets(cloud)
    for profile in live:
        agent = cloud.fleet.device(cloud.ids[profile]).agent
        assert agent is not None
        assert sorted(agent.trusted_key_ids) == sorted([old_key.key_id, new_id])

    # The killed device still trusts only the old key: retiring it is refused.
    code, refused = cloud.cli("keys", "retire", old_key.key_id)
    assert code == 1 and refused["error"]["code"] == "key_rotation_error"
    assert victim in refused["error"]["message"]
    code, status = cloud.cli("keys", "status")
    assert code == 1 and status["lagging"] == [victim]

    # It comes back, walks the retained chain, and reports it.
    assert cloud.fleet.inject("restart", victim).ok
    assert cloud.fleet.wait_connected(30, [victim]) == []
    assert wait_until(lambda: key_sets(cloud)["rpi4"] == 1)
    assert wait_until(lambda: cloud.cli("keys", "status")[0] == 0, timeout=15)

    # Refusals say why and change nothing.
    code, active = cloud.cli("keys", "retire", new_id)
    assert code == 1 and "active signing key" in active["error"]["message"]
    code, unknown = cloud.cli("keys", "retire", "0123456789abcdef")
    assert code == 1 and "not in key set 1" in unknown["error"]["message"]

    code, retired = cloud.cli("keys", "retire", old_key.key_id)
    assert code == 0, retired
    assert retired["key_set_version"] == 2 and retired["retired_key_id"] == old_key.key_id
    assert wait_until(lambda: set(key_sets(cloud).values()) == {2}), key_sets(cloud)

    # A release signed by the new key installs; the retired key signs nothing any more.
    v2, v3 = cloud.register(2), cloud.register(3)
    code, summary = cloud.publish(f"{MODEL}:{v2}", "--wait", "--timeout", "60")
    assert code == 0 and summary["key_id"] == new_id, summary
    assert cloud.running() == {"rpi4": v2, "jetson-like": v2, "mcu-gateway": None}

    topics = Topics(cloud.fleet.config.topic_prefix)
    rejected: list[DeviceEvent] = []
    got = threading.Event()

    def on_event(msg: MqttMessage) -> None:
        event = decode(msg.payload, DeviceEvent)
        if event.kind == "release_rejected" and event.version == v3:
            rejected.append(event)
            got.set()

    watcher = MqttTransport(mqtt_settings, client_id=f"keys-watch-{uuid.uuid4().hex[:6]}")
    watcher.connect()
    try:
        watcher.subscribe(topics.all_device("events"), on_event, qos=1, wait=True)
        manifest = build_manifest(cloud.registry.get(MODEL, v3))
        forged = encode(sign_release(manifest, old_key))
        watcher.publish(topics.release(MODEL, v3), forged, qos=1, retain=True, wait=True)
        assert got.wait(15)
        time.sleep(0.5)
    finally:
        watcher.close()
    assert {e.reason for e in rejected} == {"unknown_key"}
    assert cloud.running() == {"rpi4": v2, "jetson-like": v2, "mcu-gateway": None}

    # The adopted keys survive a restart (trust.json), before any chain arrives.
    assert cloud.fleet.inject("kill", victim).ok
    trust_file = cloud.fleet.device(victim).config.data_dir / "trust.json"
    assert '"version": 2' in trust_file.read_text()
