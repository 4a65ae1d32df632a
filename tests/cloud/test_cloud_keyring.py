"""The cloud's key ring: rotation and retirement rules, crash recovery, the trust chain
it publishes and the retained state it signs again (on real Mosquitto), and the
``fogline keys`` commands' refusals."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fogline.cloud import KeyRing, Registry, publish_release, publish_trust
from fogline.cloud.cli import app
from fogline.protocol import (
    KeyRotationError,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    SignedDesiredState,
    SignedRelease,
    SigningKey,
    TensorSpec,
    Topics,
    TrustChain,
    TrustState,
    advance_trust,
    decode,
    free_port,
    verify_desired,
    verify_release,
)

runner = CliRunner()


def register(data_dir: Path, versions: int = 1) -> Registry:
    registry = Registry(data_dir)
    spec = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
    for v in range(versions):
        blob = data_dir / f"blob-{v}.onnx"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f"artifact {v}".encode())
        registry.register(
            "fake",
            artifacts={"fp32": blob},
            assignments={"cpu-1t": "fp32"},
            inputs=spec,
            outputs=spec,
            source="test",
            lineage={},
            card={},
            example_input={"input": np.zeros((1, 4), np.float32)},
        )
    return registry


def test_rotate_and_retire_build_a_chain_agents_can_walk(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    first = ring.active
    assert ring.chain() is None and ring.current() == TrustState(0, (first.public_key,))

    rotated = ring.rotate()
    second = ring.active
    assert rotated.version == 1 and rotated.active_key_id == second.key_id != first.key_id
    assert ring.current().key_ids == [first.key_id, second.key_id]
    retired = ring.retire(first.key_id)
    assert retired.version == 2 and retired.retired_key_id == first.key_id
    assert ring.current().key_ids == [second.key_id]
    assert KeyRing(tmp_path).active.key_id == second.key_id  # it persisted

    chain = ring.chain()
    assert chain is not None and [link.key_set.version for link in chain.links] == [1, 2]
    walked = advance_trust(TrustState(0, (first.public_key,)), chain)
    assert walked.adopted == [1, 2] and walked.state.key_ids == [second.key_id]
    assert ring.trust().keys() == [second.public_key]


def test_retirement_refusals_leave_the_chain_alone(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    with pytest.raises(KeyRotationError, match="active signing key"):
        ring.retire(ring.active.key_id)
    with pytest.raises(KeyRotationError, match="not in key set 0"):
        ring.retire("0123456789abcdef")
    assert ring.chain() is None


def test_a_full_key_set_must_retire_before_rotating(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    for _ in range(15):
        ring.rotate()
    assert len(ring.current().keys) == 16
    with pytest.raises(KeyRotationError, match="retire one"):
        ring.rotate()
    assert ring.current().version == 15


def test_a_rotation_interrupted_before_the_chain_is_undone(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    active = ring.active.key_id
    SigningKey.generate().save(tmp_path / "keys" / "next-signing.pem")  # crashed at step 1
    again = KeyRing(tmp_path)
    assert again.active.key_id == active and not (tmp_path / "keys" / "next-signing.pem").exists()


def test_a_rotation_interrupted_after_the_chain_is_finished(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.rotate()
    expected = ring.active
    # Replay the crash: the new key back at its pending path, the old one active.
    keys = tmp_path / "keys"
    (keys / "cloud-signing.pem").replace(keys / "next-signing.pem")
    SigningKey.generate().save(keys / "cloud-signing.pem")
    assert KeyRing(tmp_path).active.key_id == expected.key_id


def test_a_corrupt_chain_is_a_typed_error(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path)
    ring.rotate()
    (tmp_path / "keys" / "trust-chain.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(KeyRotationError, match="corrupt"):
        ring.current()


def test_publish_trust_signs_the_retained_state_again(
    tmp_path: Path, mqtt_settings: MqttSettings
) -> None:
    registry = register(tmp_path, versions=2)
    ring = KeyRing(tmp_path)
    topics = Topics(f"fogline-keys/{uuid.uuid4().hex[:10]}")
    transport = MqttTransport(mqtt_settings, client_id=f"keys-{uuid.uuid4().hex[:6]}")
    transport.connect()
    try:
        publish_release(registry, "fake", 2, transport, ring.active, topics=topics)
        publish_release(
            registry, "fake", 1, transport, ring.active, topics=topics, scope="group:canary",
            rollback=True,
        )  # fmt: skip
        old = ring.active
        ring.rotate()
        result = publish_trust(ring, registry, transport, topics=topics)
        assert result.key_set_version == 1
        assert result.releases == ["fake:1", "fake:2"]
        assert result.desired_topics == [topics.fleet_desired(), topics.group_desired("canary")]

        seen: dict[str, bytes] = {}
        done = threading.Event()

        def on_message(msg: MqttMessage) -> None:
            seen[msg.topic] = msg.payload
            if len(seen) == 5:
                done.set()

        for topic_filter in (
            topics.fleet_keys(),
            topics.fleet_desired(),
            topics.all_group_desired(),
            topics.releases_of("fake"),
        ):
            transport.subscribe(topic_filter, on_message, qos=1, wait=True)
        assert done.wait(10), sorted(seen)
    finally:
        transport.close()

    new_only = ring.trust()  # after retiring, agents trust just this key
    new_only.replace([ring.active.public_key])
    chain = decode(seen[topics.fleet_keys()], TrustChain)
    assert advance_trust(TrustState(0, (old.public_key,)), chain).adopted == [1]
    fleet = verify_desired(decode(seen[topics.fleet_desired()], SignedDesiredState), new_only)
    group = verify_desired(
        decode(seen[topics.group_desired("canary")], SignedDesiredState), new_only
    )
    assert fleet.models["fake"].version == 2 and group.models["fake"].allow_rollback
    for version in (1, 2):
        signed = decode(seen[topics.release("fake", version)], SignedRelease)
        assert verify_release(signed, new_only).version == version
    # Same sequences: agents take them as the state they already follow.
    assert fleet.sequence == registry.desired("fleet").sequence  # type: ignore[union-attr]


def test_keys_commands_refuse_with_one_typed_line(tmp_path: Path) -> None:
    base = ["--data-dir", str(tmp_path), "--json"]
    result = runner.invoke(app, ["keys", "retire", "0123456789abcdef", "--force", *base])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "key_rotation_error"

    # The broker is down: the rotation stands on disk and the message says how to finish.
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["keys", "rotate", "--broker", url, *base])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert "fogline keys publish" in error["message"] and "saved" in error["message"]
    shown = json.loads(runner.invoke(app, ["keys", "show", *base]).stdout)
    assert shown["key_set_version"] == 1 and len(shown["trusted_keys"]) == 2

    result = runner.invoke(app, ["keys", "rotate", "--no-publish", *base])
    assert result.exit_code == 0 and json.loads(result.stdout)["published"] is False
    result = runner.invoke(app, ["keys", "status", "--broker", url, *base])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "broker_unavailable"
