"""Test helpers for the firmware simulator: a stand-in for the cloud's publisher that
signs releases with one variant per simulated device class and serves their artifacts,
built on tests/edge/_release_kit.py (reused, not copied)."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit

from _release_kit import (
    INPUT_SPECS,
    OUTPUT_SPECS,
    ArtifactServer,
    ReleaseKit,
    build_model,
    publish,
    sha256,
)

from fogline.protocol import (
    MqttSettings,
    MqttTransport,
    ReleaseManifest,
    ReleaseVariant,
    SignedRelease,
    Topics,
    sign_release,
)

__all__ = ["SIM_CLASSES", "SimCloud", "build_model"]

SIM_CLASSES = ("cpu-1t", "cpu-4t")  # the classes with a variant; `mcu` has none


class SimCloud:
    """Stands in for the cloud's publisher: signs and publishes releases with one variant
    per simulated device class, and serves their artifacts."""

    def __init__(self, settings: MqttSettings, topics: Topics) -> None:
        self.topics = topics
        self.kit = ReleaseKit(topics)
        self.artifacts = ArtifactServer(settings, topics)
        self.transport = MqttTransport(settings, client_id=f"sim-cloud-{uuid.uuid4().hex[:8]}")

    @property
    def public_key(self) -> str:
        return self.kit.public_key

    def start(self) -> SimCloud:
        self.artifacts.start()
        self.transport.connect()
        return self

    def close(self) -> None:
        self.transport.close()
        self.artifacts.close()

    def release(
        self, model: str, version: int, artifact: bytes, chunk_size: int = 64 * 1024
    ) -> SignedRelease:
        digest = self.artifacts.add(artifact)
        now = time.time()
        manifest = ReleaseManifest(
            model=model,
            version=version,
            created_at=now,
            expires_at=now + 3600,
            key_id="unsigned",
            variants=[
                ReleaseVariant(
                    device_class=cls,
                    quantization="fp32",
                    sha256=digest,
                    size=len(artifact),
                    chunk_size=min(chunk_size, len(artifact)),
                    inputs=INPUT_SPECS,
                    outputs=OUTPUT_SPECS,
                )
                for cls in SIM_CLASSES
            ],
        )
        assert sha256(artifact) == digest
        signed = sign_release(manifest, self.kit.key)
        publish(self.transport, self.topics.release(model, version), signed)
        return signed

    def desire(self, model: str, version: int, sequence: int) -> None:
        desired = self.kit.desired("fleet", {model: version}, sequence=sequence)
        publish(self.transport, self.topics.fleet_desired(), desired)

