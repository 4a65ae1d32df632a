"""Rollout at fleet scale in one process: many real agents fetch one signed release from
the cloud's real artifact service (cache, QoS 0 chunk replies) and all serve it; a
fleet too large for paho-mqtt's select() loop is refused up front instead of stalling
with agents that never connect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _release_kit import ReleaseKit, build_model, publish

from fogline.cloud import ArtifactService, ArtifactStore
from fogline.firmware_sim import SimulatedFleet
from fogline.protocol import ConfigError, MqttSettings, MqttTransport, Topics

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


def _fleet(url: str, key: str, topics: Topics, root: Path, devices: int) -> SimulatedFleet:
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
    )


def test_forty_agents_in_one_process_all_install_a_multi_chunk_release(
    no_thread_left: None,  # first, so it checks after the service has closed
    cloud: ArtifactService,
    mqtt_settings: MqttSettings,
    sim_topics: Topics,
    tmp_path: Path,
) -> None:
    kit = ReleaseKit(sim_topics)
    data = build_model(seed=3, channels=24)  # ~50 KB
    sha = cloud.store.put_bytes(data)
    chunk = 16 * 1024  # several chunks per agent, several pieces per artifact
    fleet = _fleet(mqtt_settings.url, kit.public_key, sim_topics, tmp_path / "fleet", AGENTS)
    with fleet:
        assert not fleet.wait_connected(60)
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
    # Every agent fetched every chunk once (a lost QoS 0 reply would be re-requested).
    assert served["chunks_served"] >= AGENTS * chunks
    assert served["errors_replied"] == 0 and served["dropped"] == 0


def test_a_fleet_that_would_run_out_of_select_descriptors_is_refused(
    mqtt_settings: MqttSettings, sim_topics: Topics, tmp_path: Path, no_thread_left: None
) -> None:
    kit = ReleaseKit(sim_topics)
    fleet = _fleet(mqtt_settings.url, kit.public_key, sim_topics, tmp_path / "fleet", 20)
    # Take most descriptor numbers below 1024, as 150 more agents would.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(900)]
    try:
        with pytest.raises(ConfigError, match=r"field 'devices'.*select"):
            fleet.start()
    finally:
        for fd in held:
            os.close(fd)
    assert not fleet.devices  # nothing was started, nothing to stop
