"""The monorepo's shape: one namespace package over four distributions, the import
boundary that keeps Ray and torch off the edge, typing markers, and the pinned public
surface of ``fogline.protocol`` (changing it must be a deliberate edit here)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {
    "shared": "protocol",
    "edge": "edge",
    "cloud": "cloud",
    "firmware-sim": "firmware_sim",
}

PROTOCOL_API = [
    "ArtifactChunk",
    "ArtifactError",
    "BreakerState",
    "BrokerInfo",
    "BrokerUnavailableError",
    "BudgetExceededError",
    "CapacityError",
    "ChunkRequest",
    "CloudUnavailableError",
    "Command",
    "ConfigError",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PREFIX",
    "DTYPES",
    "DType",
    "DecodeError",
    "DesiredModel",
    "DesiredState",
    "DeviceEvent",
    "DeviceState",
    "EmbeddedBroker",
    "Envelope",
    "ErrorReply",
    "EventKind",
    "FleetError",
    "FleetStoreUnavailableError",
    "FoglineError",
    "Heartbeat",
    "Identifier",
    "InferenceInputError",
    "InferenceRequest",
    "InferenceResponse",
    "InvalidIdError",
    "InvalidModelError",
    "LoopGroup",
    "MAX_CHUNK_SIZE",
    "MAX_ID_LENGTH",
    "MAX_TENSOR_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "MESSAGE_TYPES",
    "Message",
    "ModelError",
    "MosquittoBroker",
    "MqttMessage",
    "MqttSettings",
    "MqttTransport",
    "NotConnectedError",
    "ParsedTopic",
    "ProtocolError",
    "PublicKey",
    "PublishError",
    "RegistryError",
    "ReleaseManifest",
    "ReleaseRejectedError",
    "ReleaseVariant",
    "SignatureError",
    "SignedDesiredState",
    "SignedRelease",
    "SigningKey",
    "SubscribeError",
    "Tensor",
    "TensorError",
    "TensorSpec",
    "TopicError",
    "TopicPrefix",
    "Topics",
    "TrainingError",
    "TransportError",
    "TrustStore",
    "UnknownDeviceError",
    "UnknownModelError",
    "Will",
    "broker_answers",
    "canonical_bytes",
    "config_error",
    "decode",
    "decode_envelope",
    "development_broker",
    "encode",
    "free_port",
    "load_settings",
    "read_toml",
    "sharing",
    "sign_desired",
    "sign_release",
    "validate_id",
    "validate_settings",
    "verify_desired",
    "verify_release",
    "KeyRotationError",
    "KeySet",
    "KeySignature",
    "SignedKeySet",
    "TrustAdvance",
    "TrustChain",
    "TrustState",
    "advance_trust",
    "issue_key_set",
]


def test_fogline_is_a_namespace_package_spanning_every_distribution() -> None:
    import fogline

    assert getattr(fogline, "__file__", None) is None
    assert type(fogline.__path__).__name__ == "_NamespacePath"
    paths = {Path(p).resolve() for p in fogline.__path__}
    expected = {(ROOT / dist / "src" / "fogline").resolve() for dist in DISTRIBUTIONS}
    assert expected <= paths


def test_no_distribution_has_a_fogline_init() -> None:
    offenders = [
        p.relative_to(ROOT)
        for p in ROOT.glob("*/src/fogline/__init__.py")
        if ".venv" not in p.parts
    ]
    assert offenders == []


@pytest.mark.parametrize(("dist", "package"), sorted(DISTRIBUTIONS.items()))
def test_every_distribution_ships_py_typed(dist: str, package: str) -> None:
    assert (ROOT / dist / "src" / "fogline" / package / "py.typed").is_file()
    assert (ROOT / dist / "pyproject.toml").is_file()


@pytest.mark.parametrize("module", ["fogline.protocol", "fogline.edge"])
def test_import_boundary_keeps_ray_torch_and_cloud_out(module: str) -> None:
    # A fresh interpreter: this test process may well have imported ray already.
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "banned = ('ray', 'torch', 'fogline.cloud')\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if any(m == b or m.startswith(b + '.') for b in banned))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_protocol_public_surface_is_pinned() -> None:
    protocol = importlib.import_module("fogline.protocol")
    assert sorted(protocol.__all__) == sorted(PROTOCOL_API)
    assert len(set(protocol.__all__)) == len(protocol.__all__)
    missing = [name for name in protocol.__all__ if not hasattr(protocol, name)]
    assert missing == []


@pytest.mark.parametrize("package", sorted(DISTRIBUTIONS.values()))
def test_every_exported_name_exists(package: str) -> None:
    # Only the protocol's surface is pinned; the others must at least not export ghosts.
    module = importlib.import_module(f"fogline.{package}")
    names = getattr(module, "__all__", [])
    assert [n for n in names if not hasattr(module, n)] == []
