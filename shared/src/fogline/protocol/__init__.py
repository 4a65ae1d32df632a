"""The contract between Fogline's tiers: messages, codec, topics, signing, the MQTT
transport, development brokers and the one settings loader every tool uses.

Everything public is re-exported here; the private modules may change.
"""

from typing import TYPE_CHECKING, Any

from ._codec import DEFAULT_MAX_PAYLOAD, Envelope, canonical_bytes, decode, decode_envelope, encode
from ._errors import (
    ArtifactError,
    BrokerUnavailableError,
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    ConfigError,
    DecodeError,
    FleetError,
    FleetStoreUnavailableError,
    FoglineError,
    InferenceInputError,
    InvalidIdError,
    InvalidModelError,
    KeyRotationError,
    ModelError,
    NotConnectedError,
    ProtocolError,
    PublishError,
    RegistryError,
    ReleaseRejectedError,
    SignatureError,
    SubscribeError,
    TensorError,
    TopicError,
    TrainingError,
    TransportError,
    UnknownDeviceError,
    UnknownModelError,
)
from ._ids import MAX_ID_LENGTH, Identifier, validate_id
from ._messages import (
    MAX_CHUNK_SIZE,
    MESSAGE_TYPES,
    ArtifactChunk,
    BreakerState,
    ChunkRequest,
    Command,
    DesiredModel,
    DesiredState,
    DeviceEvent,
    DeviceState,
    ErrorReply,
    EventKind,
    Heartbeat,
    InferenceRequest,
    InferenceResponse,
    KeySet,
    KeySignature,
    Message,
    ReleaseManifest,
    ReleaseVariant,
    SignedDesiredState,
    SignedKeySet,
    SignedRelease,
    TensorSpec,
    TrustChain,
)
from ._mqtt_loop import LoopGroup, sharing
from ._mqtt_settings import MqttSettings, Will
from ._settings_loader import (
    TopicPrefix,
    config_error,
    load_settings,
    read_toml,
    validate_settings,
)
from ._signing import (
    PublicKey,
    SigningKey,
    TrustStore,
    sign_desired,
    sign_release,
    verify_desired,
    verify_release,
)
from ._tensors import DTYPES, MAX_TENSOR_BYTES, MAX_TENSOR_ELEMENTS, DType, Tensor
from ._topics import DEFAULT_PREFIX, ParsedTopic, Topics
from ._transport import MqttMessage, MqttTransport
from ._trust_chain import TrustAdvance, TrustState, advance_trust, issue_key_set

if TYPE_CHECKING:
    from ._devbroker import BrokerInfo, MosquittoBroker, development_broker
    from ._embedded_broker import EmbeddedBroker
    from ._probes import broker_answers, free_port

# Development brokers (asyncio, amqtt, subprocess) load on first use: an edge agent never
# needs them, and importing them costs it memory and start-up time.
_LAZY = {
    "BrokerInfo": "._devbroker",
    "MosquittoBroker": "._devbroker",
    "development_broker": "._devbroker",
    "EmbeddedBroker": "._embedded_broker",
    "broker_answers": "._probes",
    "free_port": "._probes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PREFIX",
    "DTYPES",
    "MAX_CHUNK_SIZE",
    "MAX_ID_LENGTH",
    "MAX_TENSOR_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "MESSAGE_TYPES",
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
    "KeyRotationError",
    "KeySet",
    "KeySignature",
    "LoopGroup",
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
    "SignedKeySet",
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
    "TrustAdvance",
    "TrustChain",
    "TrustState",
    "TrustStore",
    "UnknownDeviceError",
    "UnknownModelError",
    "Will",
    "advance_trust",
    "broker_answers",
    "canonical_bytes",
    "config_error",
    "decode",
    "decode_envelope",
    "development_broker",
    "encode",
    "free_port",
    "issue_key_set",
    "load_settings",
    "read_toml",
    "sharing",
    "sign_desired",
    "sign_release",
    "validate_id",
    "validate_settings",
    "verify_desired",
    "verify_release",
]
