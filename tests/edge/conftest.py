"""Fixtures for the edge agent tests: a signer, an artifact server, an observer, and an
agent factory that always stops what it started (even when the test fails)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for _release_kit (tests have no packages)

import contextlib

from _release_kit import ArtifactServer, Observer, ReleaseKit

from fogline.edge import Agent, AgentConfig, load_config
from fogline.protocol import MqttSettings, Topics


@pytest.fixture
def topics() -> Topics:
    """A prefix of this test's own, so retained messages never leak between tests."""
    return Topics(f"fogline-test/{uuid.uuid4().hex[:10]}")


@pytest.fixture
def kit(topics: Topics) -> ReleaseKit:
    return ReleaseKit(topics)


@pytest.fixture
def artifact_server(mqtt_settings: MqttSettings, topics: Topics) -> Iterator[ArtifactServer]:
    server = ArtifactServer(mqtt_settings, topics).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def observer_factory(
    mqtt_settings: MqttSettings, topics: Topics
) -> Iterator[Callable[..., Observer]]:
    made: list[Observer] = []

    def make(device_id: str = "dev-1", settings: MqttSettings | None = None) -> Observer:
        obs = Observer(settings or mqtt_settings, topics, device_id).start()
        made.append(obs)
        return obs

    try:
        yield make
    finally:
        for obs in made:
            obs.close()


@pytest.fixture
def config_factory(
    tmp_path: Path, mqtt_settings: MqttSettings, topics: Topics, kit: ReleaseKit
) -> Callable[..., AgentConfig]:
    def make(device_id: str = "dev-1", **overrides: Any) -> AgentConfig:
        base: dict[str, Any] = {
            "device_id": device_id,
            "mqtt": mqtt_settings.model_dump(),
            "topic_prefix": topics.prefix,
            "trusted_keys": [kit.public_key],
            "data_dir": str(tmp_path / device_id),
            "heartbeat_interval_s": 0.5,
            "http": {"enabled": False},
            "models": ["digits"],
            "delivery": {"chunk_timeout_s": 2.0, "chunk_retries": 3},
        }
        base.update(overrides)
        return load_config(env={}, **base)

    return make


@pytest.fixture
def agent_factory(config_factory: Callable[..., AgentConfig]) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(config: AgentConfig | None = None, start: bool = True, **kwargs: Any) -> Agent:
        agent = Agent(config or config_factory(**kwargs))
        agents.append(agent)
        if start:
            agent.start()
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses a test starts; killed (whole session) at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
