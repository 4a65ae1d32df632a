"""Verified delivery: a signed release is downloaded, verified, installed and served;
bad releases are rejected with an event while the old model keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _release_kit import (
    ArtifactServer,
    Observer,
    ReleaseKit,
    build_model,
    publish,
    sample_input,
)

from fogline.edge import Agent
from fogline.protocol import (
    InferenceInputError,
    SigningKey,
    Topics,
    UnknownModelError,
)


def _install(kit: ReleaseKit, server: ArtifactServer, version: int, seed: int, **kw: Any) -> bytes:
    data = build_model(seed=seed)
    server.add(data)
    signed = kit.release("digits", version, data, **kw)
    publish(server._transport, kit.topics.release("digits", version), signed)
    return data


def test_happy_path_downloads_installs_serves_and_reports(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    with pytest.raises(UnknownModelError):
        agent.infer("digits", {"input": sample_input()})
    _install(kit, artifact_server, 1, seed=0)
    assert agent.wait_for_version("digits", 1, timeout=20)
    result = agent.infer("digits", {"input": sample_input()})
    assert result.version == 1 and result.where == "edge" and result.model == "digits"
    assert result.outputs["logits"].shape == (1, 10)
    assert result.met_budget is None and not result.late
    obs.wait_event(kind="install_succeeded", model="digits", version=1)
    obs.wait_for(
        lambda: [h for h in obs.heartbeats() if h.models.get("digits") == 1 and h.requests >= 1]
    )
    with pytest.raises(InferenceInputError):
        agent.infer("digits", {"input": sample_input().astype(np.float64)})
    assert agent.status().models["digits"].version == 1


def _serving(agent: Agent) -> int:
    return agent.infer("digits", {"input": sample_input()}).version


def test_rejected_releases_leave_the_old_model_serving(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    _install(kit, artifact_server, 2, seed=2)
    assert agent.wait_for_version("digits", 2, timeout=20)
    pub = artifact_server._transport
    topics = kit.topics

    # An older version, published live: a rollback nobody signed for.
    _install(kit, artifact_server, 1, seed=1)
    obs.wait_event(kind="release_rejected", version=1, reason="rollback")

    # A tampered chunk (its own chunk hash recomputed): only the whole-file hash catches it.
    data3 = build_model(seed=3)
    sha3 = artifact_server.add(data3)
    artifact_server.tamper[(sha3, 4096)] = lambda b: bytes([b[0] ^ 0xFF]) + b[1:]
    publish(pub, topics.release("digits", 3), kit.release("digits", 3, data3))
    obs.wait_event(kind="install_failed", version=3, reason="hash_mismatch")

    # A manifest altered after signing.
    good = kit.release("digits", 4, build_model(seed=4))
    forged = good.model_copy(
        update={"manifest": good.manifest.model_copy(update={"expires_at": 4e9})}
    )
    publish(pub, topics.release("digits", 4), forged)
    obs.wait_event(kind="release_rejected", version=4, reason="bad_signature")

    # Signed by a key the agent does not pin.
    data5 = build_model(seed=5)
    artifact_server.add(data5)
    publish(
        pub, topics.release("digits", 5), kit.release("digits", 5, data5, key=SigningKey.generate())
    )
    obs.wait_event(kind="release_rejected", version=5, reason="unknown_key")

    # Expired.
    publish(pub, topics.release("digits", 6), kit.release("digits", 6, data5, expires_in=-60))
    obs.wait_event(kind="release_rejected", version=6, reason="expired")

    # No variant for this device class.
    publish(
        pub, topics.release("digits", 7), kit.release("digits", 7, data5, device_class="jetson")
    )
    obs.wait_event(kind="release_rejected", version=7, reason="wrong_device_class")

    # Garbage on a release topic.
    pub.publish(topics.release("digits", 8), b"\x93garbage", qos=1, retain=True, wait=True)
    obs.wait_event(kind="release_rejected", version=8, reason="malformed")

    assert _serving(agent) == 2
    assert agent.status().models["digits"].version == 2
    assert not obs.events(kind="install_succeeded", version=3)
    # The rejected bytes were never requested for the refused releases.
    assert all(
        sha != kit.release("digits", 5, data5).manifest.variants[0].sha256
        for sha, _ in artifact_server.requests
    )


def test_self_test_failure_keeps_old_model(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    _install(kit, artifact_server, 1, seed=1)
    assert agent.wait_for_version("digits", 1, timeout=20)
    nan_model = build_model(seed=9, nan=True)
    artifact_server.add(nan_model)
    publish(
        artifact_server._transport,
        kit.topics.release("digits", 2),
        kit.release("digits", 2, nan_model),
    )
    obs.wait_event(kind="install_failed", version=2, reason="self_test_failed")
    assert _serving(agent) == 1
    # The last good model stays on disk, the failed one does not.
    files = sorted(p.name for p in (agent.config.data_dir / "models" / "digits").glob("*.onnx"))
    assert len(files) == 1 and files[0].startswith("1-")


def test_desired_state_pins_versions_and_signed_rollback(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    topics: Topics = kit.topics
    pub = artifact_server._transport
    _install(kit, artifact_server, 1, seed=1)
    _install(kit, artifact_server, 2, seed=2)
    # The fleet asks for v1: the agent installs v1 although v2 exists.
    publish(pub, topics.fleet_desired(), kit.desired("fleet", {"digits": 1}, sequence=1))
    agent = agent_factory(groups=["canary"])
    assert agent.wait_for_version("digits", 1, timeout=20)
    # The canary group moves to v2 (group beats fleet).
    publish(
        pub,
        topics.group_desired("canary"),
        kit.desired("group", {"digits": 2}, sequence=1, target="canary"),
    )
    assert agent.wait_for_version("digits", 2, timeout=20)
    # Back to v1 without allow_rollback: refused.
    publish(
        pub,
        topics.group_desired("canary"),
        kit.desired("group", {"digits": 1}, sequence=2, target="canary"),
    )
    obs.wait_event(kind="release_rejected", version=1, reason="rollback")
    assert _serving(agent) == 2
    # A signed rollback: v1 comes back from the last good model on disk.
    publish(
        pub,
        topics.device_desired("dev-1"),
        kit.desired("device", {"digits": 1}, sequence=1, target="dev-1", allow_rollback=True),
    )
    assert agent.wait_for_version("digits", 1, timeout=20)
    obs.wait_event(kind="rollback", version=1)
    # A replayed older desired state (stale sequence) and a forged one are refused.
    publish(
        pub,
        topics.group_desired("canary"),
        kit.desired("group", {"digits": 2}, sequence=1, target="canary"),
    )
    obs.wait_event(kind="desired_rejected", reason="stale")
    publish(
        pub,
        topics.fleet_desired(),
        kit.desired("fleet", {"digits": 2}, sequence=5, key=SigningKey.generate()),
    )
    obs.wait_event(kind="desired_rejected", reason="unknown_key")
    # A desired state for another device, replayed on our topic.
    publish(
        pub,
        topics.device_desired("dev-1"),
        kit.desired("device", {"digits": 2}, sequence=9, target="dev-2", allow_rollback=True),
    )
    obs.wait_event(kind="desired_rejected", reason="wrong_target")
    assert _serving(agent) == 1


def test_missing_artifact_and_garbage_desired_state_are_reported(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory(
        delivery={"chunk_timeout_s": 1.0, "chunk_retries": 2, "window": 2, "retry_after_s": 1.0}
    )
    _install(kit, artifact_server, 1, seed=1)
    assert agent.wait_for_version("digits", 1, timeout=20)
    pub = artifact_server._transport
    # A valid release whose artifact the service does not have: ErrorReply, retries, event.
    data = build_model(seed=2)
    publish(pub, kit.topics.release("digits", 2), kit.release("digits", 2, data))
    event = obs.wait_event(kind="install_failed", version=2, reason="download_failed", timeout=30)
    assert "artifact service answered" in event.detail
    pub.publish(kit.topics.fleet_desired(), b"\x00garbage", qos=1, retain=True, wait=True)
    obs.wait_event(kind="desired_rejected", reason="malformed")
    assert _serving(agent) == 1
    # Once the artifact exists, the backed-off retry fetches and installs it.
    artifact_server.add(data)
    assert agent.wait_for_version("digits", 2, timeout=30)


def test_desired_sequence_is_recorded_before_install_and_survives_a_restart(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    """The sequence is written by the delivery worker, not the network thread: it is on
    disk once the install it asked for is, and a restarted agent still refuses a
    replayed older desired state."""
    obs = observer_factory()
    topics: Topics = kit.topics
    pub = artifact_server._transport
    _install(kit, artifact_server, 1, seed=1)
    _install(kit, artifact_server, 2, seed=2)
    publish(pub, topics.fleet_desired(), kit.desired("fleet", {"digits": 2}, sequence=7))
    agent = agent_factory()
    assert agent.wait_for_version("digits", 2, timeout=20)
    recorded = agent.config.data_dir / "desired_sequences.json"
    assert json.loads(recorded.read_text()) == {"fleet": 7}
    agent.stop()
    again = agent_factory(config=agent.config)
    assert again.wait_for_version("digits", 2, timeout=20)
    publish(
        pub,
        topics.fleet_desired(),
        kit.desired("fleet", {"digits": 1}, sequence=6, allow_rollback=True),
    )
    obs.wait_event(kind="desired_rejected", reason="stale")
    assert _serving(again) == 2


def test_a_chunk_damaged_in_transit_is_fetched_again_alone(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
) -> None:
    """A chunk whose bytes break its own sha256 is found once the whole file fails, and
    only that chunk is fetched again; the release then installs."""
    agent = agent_factory()
    data = build_model(seed=5)
    sha = artifact_server.add(data)
    chunk_size = kit.release("digits", 1, data).manifest.variants[0].chunk_size
    assert len(data) > 2 * chunk_size
    artifact_server.garble_once[(sha, chunk_size)] = lambda b: bytes([b[0] ^ 0xFF]) + b[1:]
    publish(
        artifact_server._transport, kit.topics.release("digits", 1), kit.release("digits", 1, data)
    )
    assert agent.wait_for_version("digits", 1, timeout=20)
    asked = artifact_server.requests
    assert asked[(sha, chunk_size)] == 2
    assert all(n == 1 for (s, offset), n in asked.items() if s == sha and offset != chunk_size)
