"""Rollout tracking and rollbacks, without a broker: the tracker fed the fleet's own
messages, and the registry's and publisher's side of a signed rollback."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from fogline.cloud import Registry, build_desired, load_signing_key, publish_release
from fogline.cloud._rollout import RolloutTracker, RolloutWatch
from fogline.protocol import (
    DesiredModel,
    DesiredState,
    DeviceEvent,
    DeviceState,
    Heartbeat,
    MqttMessage,
    MqttTransport,
    RegistryError,
    SigningKey,
    TensorSpec,
    Topics,
    TrustStore,
    encode,
    sign_desired,
)

from .conftest import tiny_classifier

T = Topics("fogline-rollout-unit")
KEY = SigningKey.generate()


def msg(topic: str, payload: bytes, retain: bool = False) -> MqttMessage:
    return MqttMessage(topic, payload, 1, retain)


def state(device: str, cls: str = "cpu-1t", groups: tuple[str, ...] = (), online: bool = True):
    body = DeviceState(
        device_id=device,
        status="online" if online else "offline",
        at=time.time(),
        device_class=cls,
        groups=list(groups),
    )
    return msg(T.device_state(device), encode(body), retain=True)


def heartbeat(device: str, version: int | None, cls: str = "cpu-1t", groups: tuple[str, ...] = ()):
    body = Heartbeat(
        device_id=device,
        device_class=cls,
        groups=list(groups),
        seq=1,
        at=time.time(),
        uptime_s=1.0,
        interval_s=5.0,
        models={} if version is None else {"digits": version},
    )
    return msg(T.heartbeat(device), encode(body))


def event(device: str, kind: str, version: int, reason: str = "") -> MqttMessage:
    body = DeviceEvent(
        device_id=device, kind=kind, at=time.time(), model="digits", version=version, reason=reason
    )  # type: ignore[arg-type]
    return msg(T.events(device), encode(body))


def desired(topic: str, version: int, key: SigningKey = KEY) -> MqttMessage:
    body = DesiredState(
        scope="group",
        target="x",
        sequence=1,
        issued_at=time.time(),
        key_id="unsigned",
        models={"digits": DesiredModel(version=version)},
    )
    return msg(topic, encode(sign_desired(body, key)), retain=True)


def tracker(scope: tuple[str, str | None] = ("fleet", None)) -> RolloutTracker:
    return RolloutTracker(
        "digits",
        2,
        scope,  # type: ignore[arg-type]
        ["cpu-1t", "cpu-4t"],
        topics=T,
        trust=TrustStore([KEY.public_key]),
    )


def outcomes(t: RolloutTracker) -> dict[str, str]:
    return {d.device_id: d.outcome for d in t.status().devices}


def test_outcomes_from_state_heartbeats_and_events() -> None:
    t = tracker()
    for device, cls in [("a", "cpu-1t"), ("b", "cpu-1t"), ("c", "mcu"), ("d", "cpu-4t")]:
        t.handle(state(device, cls))
    t.handle(state("e", online=False))
    assert outcomes(t) == {
        "a": "pending",
        "b": "pending",
        "c": "no_variant",
        "d": "pending",
        "e": "offline",
    }
    assert t.status().target == 3 and not t.status().settled

    t.handle(event("a", "install_succeeded", 2))  # an install event
    t.handle(heartbeat("b", 2))  # or a heartbeat saying it runs it
    t.handle(event("d", "install_failed", 2, reason="hash_mismatch"))
    t.handle(event("d", "install_failed", 1, reason="other version"))  # not this rollout's
    status = t.status()
    assert outcomes(t) == {
        "a": "updated",
        "b": "updated",
        "c": "no_variant",
        "d": "failed",
        "e": "offline",
    }
    assert status.settled and status.counts["failed"] == 1
    assert next(d for d in status.devices if d.device_id == "d").reason == "hash_mismatch"
    assert all(d.updated_s is not None for d in status.devices if d.outcome == "updated")

    t.handle(event("d", "install_succeeded", 2))  # a retry that worked
    assert outcomes(t)["d"] == "updated"
    t.handle(heartbeat("e", 1))  # back online, still on v1
    assert outcomes(t)["e"] == "pending"
    summary = t.status("complete").summary()
    assert json.loads(json.dumps(summary))["counts"]["updated"] == 3


def test_a_rollback_install_counts_as_updated() -> None:
    t = tracker()
    t.handle(state("a"))
    t.handle(event("a", "rollback", 2))
    assert outcomes(t) == {"a": "updated"}


def test_overrides_of_higher_precedence_hold_devices() -> None:
    t = tracker()
    t.handle(state("a", groups=("canary",)))
    t.handle(state("b", groups=("lab", "canary")))
    t.handle(state("c"))
    t.handle(desired(T.group_desired("canary"), 3))
    t.handle(desired(T.group_desired("lab"), 2))  # names the rollout's version: no hold
    t.handle(desired(T.device_desired("c"), 1))
    got = {d.device_id: (d.outcome, d.reason) for d in t.status().devices}
    assert got == {
        "a": ("held", "group:canary wants v3"),
        "b": ("pending", ""),  # its first group, lab, names v2
        "c": ("held", "device:c wants v1"),
    }
    t.handle(msg(T.device_desired("c"), b""))  # the override cleared
    assert outcomes(t)["c"] == "pending"


def test_group_scope_covers_its_members_only() -> None:
    t = tracker(("group", "canary"))
    t.handle(state("a", groups=("canary",)))
    t.handle(state("b", groups=("lab",)))
    t.handle(state("c", groups=("lab", "canary")))
    t.handle(desired(T.group_desired("lab"), 1))  # before canary in c's list
    t.handle(desired(T.device_desired("a"), 3))
    assert {d.device_id: d.outcome for d in t.status().devices} == {"a": "held", "c": "held"}

    d = tracker(("device", "b"))
    for name in "abc":
        d.handle(state(name))
    assert outcomes(d) == {"b": "pending"}


def test_garbage_and_forged_desired_states_are_counted_and_ignored() -> None:
    t = tracker()
    t.handle(state("a", groups=("canary",)))
    forged = desired(T.group_desired("canary"), 3, key=SigningKey.generate())
    for bad in [
        msg(T.heartbeat("a"), b"\x00garbage"),
        msg(T.events("a"), encode(DeviceState(device_id="a", status="online", at=1.0))),
        msg("elsewhere/devices/a/state", b""),
        msg(T.group_desired("canary"), b"not msgpack"),
        forged,
        msg(T.heartbeat("a"), heartbeat("b", 2).payload),  # another device's, on a's topic
    ]:
        t.handle(bad)
    status = t.status()
    assert status.ignored_messages == 6
    assert outcomes(t) == {"a": "pending"}  # the forged hold did not count


# -- the registry and the publisher ----------------------------------------------------------
def _register(registry: Registry, tmp_path: Path, seed: int) -> int:
    path = tiny_classifier(tmp_path / f"m{seed}.onnx", seed=seed)
    spec_in = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
    spec_out = [TensorSpec(name="logits", dtype="float32", shape=[-1, 3])]
    return registry.register(
        "digits",
        artifacts={"fp32": path},
        assignments={"cpu-1t": "fp32"},
        inputs=spec_in,
        outputs=spec_out,
        source="test",
        lineage={},
        card={},
    ).version


def test_desired_records_keep_rollbacks_and_read_old_rows(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.update_desired("fleet", None, "digits", 2)
    registry.update_desired("fleet", None, "other", 5)
    rec = registry.update_desired("fleet", None, "digits", 1, allow_rollback=True)
    assert rec.models == {"digits": 1, "other": 5} and rec.rollbacks == {"digits"}
    assert registry.desired("fleet") == rec
    signed_models = build_desired(rec).models
    assert signed_models["digits"].allow_rollback and not signed_models["other"].allow_rollback
    # The next forward publish is no rollback.
    assert registry.update_desired("fleet", None, "digits", 3).rollbacks == frozenset()
    # A registry written before rollbacks existed: bare versions.
    with sqlite3.connect(registry.db_path) as db:
        db.execute("UPDATE desired SET models=? WHERE scope='fleet'", (json.dumps({"digits": 4}),))
    old = registry.desired("fleet")
    assert old is not None and old.models == {"digits": 4} and old.rollbacks == frozenset()


def test_publishing_an_older_version_needs_rollback(
    tmp_path: Path, transports: Callable[[], MqttTransport]
) -> None:
    registry = Registry(tmp_path)
    v1, v2 = _register(registry, tmp_path, 1), _register(registry, tmp_path, 2)
    key = load_signing_key(tmp_path)
    transport = transports()
    transport.connect()
    topics = Topics(f"fogline-rollback-{tmp_path.name}")
    publish_release(registry, "digits", v2, transport, key, topics=topics)
    before = registry.desired("fleet")
    with pytest.raises(RegistryError, match=r"older than v2.*--rollback"):
        publish_release(registry, "digits", v1, transport, key, topics=topics)
    assert registry.desired("fleet") == before  # nothing moved
    assert registry.get("digits", v1).status == "registered"
    # Another scope has no v2 yet: no rollback there.
    publish_release(registry, "digits", v1, transport, key, topics=topics, scope="group:lab")
    result = publish_release(registry, "digits", v1, transport, key, topics=topics, rollback=True)
    assert result.desired.desired.models["digits"] == DesiredModel(version=1, allow_rollback=True)


def test_wait_results() -> None:
    t = tracker()
    t.handle(state("a"))
    t.handle(state("b"))
    watch = RolloutWatch(cast(MqttTransport, None), t)  # wait() reads only the tracker
    seen: list[int] = []
    status = watch.wait(0.2, on_change=lambda s: seen.append(s.counts["pending"]))
    assert status.result == "timed_out" and seen and seen[-1] == 2
    t.handle(event("a", "install_failed", 2, reason="load_failed"))
    assert watch.wait(5, max_failures=0).result == "aborted"  # b still pending
    t.handle(event("b", "install_succeeded", 2))
    assert watch.wait(5).result == "failed"  # settled, with a failure
    assert watch.wait(5, max_failures=1).result == "complete"  # tolerated
    t.handle(event("a", "install_succeeded", 2))
    assert watch.wait(5).result == "complete"
