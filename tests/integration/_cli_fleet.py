"""A cloud data directory, the artifact service and a simulated fleet of real agents
(rpi4, jetson-like, mcu-gateway) on real Mosquitto, for the CLI tests."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit
from _release_kit import INPUT_SPECS, OUTPUT_SPECS, build_model, sample_input

from fogline.cloud import ArtifactService, Registry, load_signing_key
from fogline.cloud.cli import app
from fogline.firmware_sim import SimulatedFleet
from fogline.protocol import MqttSettings, MqttTransport, Topics

MODEL = "digits"
CLASSES = ("cpu-1t", "cpu-4t")  # rpi4 and jetson-like; mcu-gateway gets no variant
runner = CliRunner()


@dataclass
class Cloud:
    data_dir: Path
    registry: Registry
    fleet: SimulatedFleet
    ids: dict[str, str]  # profile -> device id

    def register(self, seed: int) -> int:
        path = self.data_dir.parent / f"model-{seed}.onnx"
        path.write_bytes(build_model(seed=seed))
        return self.registry.register(
            MODEL,
            artifacts={"fp32": path},
            assignments={c: "fp32" for c in CLASSES},
            inputs=INPUT_SPECS,
            outputs=OUTPUT_SPECS,
            source="imported",
            lineage={},
            card={},
            example_input={"input": sample_input()},
        ).version

    def publish(self, *args: str) -> tuple[int, dict[str, Any]]:
        return self.cli("model", "publish", *args)

    def cli(self, *args: str) -> tuple[int, dict[str, Any]]:
        """``fogline ARGS --data-dir ... --json``: the exit code and the JSON it printed."""
        result = runner.invoke(app, [*args, "--data-dir", str(self.data_dir), "--json"])
        return result.exit_code, json.loads(result.stdout)

    def running(self) -> dict[str, int | None]:
        out = {}
        for profile, device_id in self.ids.items():
            agent = self.fleet.device(device_id).agent
            loaded = None if agent is None else agent.models().get(MODEL)
            out[profile] = None if loaded is None else loaded.version
        return out


@contextmanager
def cli_fleet(
    mqtt_settings: MqttSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cloud]:
    """The CLI reads the broker and topic prefix from the environment, as a user's would."""
    topics = Topics(f"fogline-rollout/{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("FOGLINE_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("FOGLINE_BROKER_URL", mqtt_settings.url)
    data_dir = tmp_path / "cloud"
    registry = Registry(data_dir)
    key = load_signing_key(data_dir)
    transport = MqttTransport(mqtt_settings, client_id=f"rollout-cloud-{uuid.uuid4().hex[:6]}")
    service = ArtifactService(transport, registry.store, topics=topics)
    fleet = SimulatedFleet(
        devices=3,
        profile_mix={"rpi4": 1.0, "jetson-like": 1.0, "mcu-gateway": 1.0},
        broker_url=mqtt_settings.url,
        trusted_keys=[key.public_key.to_text()],
        data_root=tmp_path / "devices",
        models=[MODEL],
        topic_prefix=topics.prefix,
        heartbeat_interval_s=0.5,
        flaps=False,
        control=False,
        seed=3,
    )
    service.start()
    transport.connect()
    try:
        fleet.start(traffic=False)
        assert fleet.wait_connected(30) == []
        ids = {profile: device for device, profile in fleet.device_profiles().items()}
        yield Cloud(data_dir, registry, fleet, ids)
    finally:
        fleet.stop()
        service.close()
        transport.close()
