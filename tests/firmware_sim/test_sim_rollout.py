"""Rollout at fleet scale in one process: many real agents fetch one signed release from
the cloud's real artifact service (cache, QoS 0 chunk replies) and all serve it; agents
whose descriptors are numbered above FD_SETSIZE (1,024) connect (paho's select() loop
could not watch them); the fleet raises a low RLIMIT_NOFILE for itself."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _release_kit import ReleaseKit, build_model, publish

from fogline.cloud import ArtifactService, ArtifactStore
from fogline.firmware_sim import SimulatedFleet
from fogline.firmware_sim._device import FleetSessionCache
from fogline.firmware_sim._fleet import ensure_descriptor_limit
from fogline.protocol import ConfigError, InvalidModelError, MqttSettings, MqttTransport, Topics

AGENTS = 40


@pytest.fixture
def cloud(
    mqtt_settings: MqttSettings, sim_topics: Topics, tmp_path: Path
) -> Iterator[ArtifactService]:
    transport = MqttTransport(mqtt_settings)
    transport.connect()
    service = ArtifactService(transport, ArtifactStore(tmp_path / "store"), topics=sim_topics)
    service.start()
    try:
        yield service
    finally:
        service.close()
        transport.close()


def _fleet(
    url: str, key: str, topics: Topics, root: Path, devices: int, per_thread: int = 1
) -> SimulatedFleet:
    return SimulatedFleet(
        devices=devices,
        profile_mix={"jetson-like": 1.0},
        broker_url=url,
        trusted_keys=[key],
        data_root=root,
        models=["digits"],
        topic_prefix=topics.prefix,
        rate_per_device=0.0,
        heartbeat_interval_s=30.0,
        link_emulation=False,
        flaps=False,
        control=False,
        agents_per_network_thread=per_thread,
    )


@pytest.mark.parametrize("per_thread", [1, 8])
def test_forty_agents_in_one_process_all_install_a_multi_chunk_release(
    no_thread_left: None,  # first, so it checks after the service has closed
    cloud: ArtifactService,
    mqtt_settings: MqttSettings,
    sim_topics: Topics,
    tmp_path: Path,
    per_thread: int,
) -> None:
    """Also with network threads shared by 8 agents each (each its own connection)."""
    kit = ReleaseKit(sim_topics)
    data = build_model(seed=3, channels=24)  # ~50 KB
    sha = cloud.store.put_bytes(data)
    chunk = 16 * 1024  # several chunks per agent, several pieces per artifact
    fleet = _fleet(
        mqtt_settings.url, kit.public_key, sim_topics, tmp_path / "fleet", AGENTS, per_thread
    )
    with fleet:
        assert not fleet.wait_connected(60)
        shared = [
            t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-fogline-sim")
        ]
        assert len(shared) == (AGENTS // per_thread if per_thread > 1 else 0)
        publish(
            cloud.transport,
            sim_topics.release("digits", 1),
            kit.release("digits", 1, data, device_class="cpu-4t", chunk_size=chunk),
        )
        publish(
            cloud.transport,
            sim_topics.fleet_desired(),
            kit.desired("fleet", {"digits": 1}, sequence=1),
        )
        # A generous bound, not a timing claim: before the fixes a stalled fleet never
        # got here at all.
        assert fleet.wait_for_version("digits", 1, timeout=120) == []
        for device_id in fleet.devices:
            downloads = tmp_path / "fleet" / device_id / "downloads"
            assert not list(downloads.glob(f"{sha}.*")), "partial download left behind"
    chunks = -(-len(data) // chunk)
    served = cloud.stats()
    # Every chunk went out, by multicast batches (coalesced requests) or unicast replies,
    # and far fewer publishes than one per agent and chunk were needed.
    assert served["chunks_multicast"] + served["chunks_served"] >= chunks
    assert served["chunks_multicast"] > 0
    assert served["errors_replied"] == 0 and served["dropped"] == 0


def test_agents_connect_with_descriptors_above_fd_setsize(
    mqtt_settings: MqttSettings, sim_topics: Topics, tmp_path: Path, no_thread_left: None
) -> None:
    kit = ReleaseKit(sim_topics)
    fleet = _fleet(mqtt_settings.url, kit.public_key, sim_topics, tmp_path / "fleet", 20)
    # Every agent's socket gets a number above 1024 (this fleet was refused before).
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with fleet:
            assert fleet.wait_connected(60) == []
            for device in fleet.devices.values():
                assert device.agent is not None and device.agent.transport is not None
                sock = device.agent.transport._client.socket()
                assert sock is not None and sock.fileno() >= 1024
    finally:
        for fd in held:
            os.close(fd)


def test_the_fleet_raises_a_low_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = sum(1 for _ in Path("/proc/self/fd").iterdir())
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 50, hard))
        ensure_descriptor_limit(100)
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised >= used + 100 * 8
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_fleet_beyond_the_hard_descriptor_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hard limit cannot be lowered and raised again: pretend it is low.
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 1024))
    with pytest.raises(ConfigError, match=r"field 'devices'.*RLIMIT_NOFILE"):
        ensure_descriptor_limit(5000)


def test_the_fleet_shares_sessions_whose_threads_do_not_spin(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_model(seed=1))
    cache = FleetSessionCache()
    session = cache.get_or_load("a" * 64, 4, model)
    assert cache.get_or_load("a" * 64, 4, model) is session  # one per artifact and budget
    single = cache.get_or_load("a" * 64, 1, model)
    assert single is not session
    assert len(cache) == 2  # held weakly: while agents use them
    options = session.get_session_options()
    assert options.intra_op_num_threads == 4
    # Idle intra-op workers sleep: a hundred devices share the host's cores.
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InvalidModelError, match=r"broken\.onnx"):
        cache.get_or_load("b" * 64, 4, broken)
