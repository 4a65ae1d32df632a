"""The one Fogline error hierarchy, shared by every tier.

Every error that Fogline raises on purpose derives from :class:`FoglineError`. Errors
from libraries (paho-mqtt reason codes, onnxruntime exceptions, pydantic validation
errors, msgpack errors) are translated into these at one place each, so callers only
ever need to catch what is drawn here::

    FoglineError
    ├── ConfigError                  bad configuration; names the field
    ├── InvalidIdError               device id, model or group name unfit for a topic
    ├── ProtocolError
    │   ├── DecodeError              a payload that is not a valid Fogline message
    │   ├── TopicError               a topic that does not parse
    │   └── TensorError              a tensor with a bad dtype, shape or size
    ├── SignatureError               a signature that does not verify, or an unknown key
    ├── KeyRotationError             the cloud refused to rotate or retire a signing key
    ├── TransportError
    │   ├── BrokerUnavailableError   the broker cannot be reached
    │   ├── NotConnectedError        an operation needing a connection had none
    │   ├── PublishError             the broker did not accept or acknowledge a publish
    │   └── SubscribeError           the broker refused a subscription
    ├── ReleaseRejectedError         a release the agent refuses (see ``reason``)
    ├── ArtifactError                a missing, truncated or corrupt artifact
    ├── ModelError
    │   ├── UnknownModelError        no such model (or version) here
    │   ├── InvalidModelError        an ONNX file that does not load, check or self-test
    │   └── InferenceInputError      wrong input names, shapes or dtypes
    ├── CapacityError                over capacity: the request was refused, not queued
    ├── BudgetExceededError          no path could meet the request's latency budget
    ├── CloudUnavailableError        the cloud path is down (timeout, breaker open)
    ├── RegistryError                the model registry refused an operation
    ├── FleetError                   the fleet monitor's store failed or refused an operation
    │   ├── FleetStoreUnavailableError  the store cannot be reached or is locked (retry)
    │   └── UnknownDeviceError       no such device in the fleet registry
    └── TrainingError                training, export or quantization failed
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BrokerUnavailableError",
    "BudgetExceededError",
    "CapacityError",
    "CloudUnavailableError",
    "ConfigError",
    "DecodeError",
    "FleetError",
    "FleetStoreUnavailableError",
    "FoglineError",
    "InferenceInputError",
    "InvalidIdError",
    "InvalidModelError",
    "KeyRotationError",
    "ModelError",
    "NotConnectedError",
    "ProtocolError",
    "PublishError",
    "RegistryError",
    "ReleaseRejectedError",
    "SignatureError",
    "SubscribeError",
    "TensorError",
    "TopicError",
    "TrainingError",
    "TransportError",
    "UnknownDeviceError",
    "UnknownModelError",
]


class FoglineError(Exception):
    """Root of every error Fogline raises on purpose.

    ``code`` is a short, stable, machine-readable name, used in error replies on the
    wire and in ``--json`` output.
    """

    code: str = "fogline_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FoglineError):
    code = "config_error"


class InvalidIdError(FoglineError, ValueError):
    code = "invalid_id"


class ProtocolError(FoglineError):
    code = "protocol_error"


class DecodeError(ProtocolError):
    code = "decode_error"


class TopicError(ProtocolError):
    code = "topic_error"


class TensorError(ProtocolError):
    code = "tensor_error"


class SignatureError(FoglineError):
    code = "signature_error"


class KeyRotationError(FoglineError):
    code = "key_rotation_error"


class TransportError(FoglineError):
    code = "transport_error"


class BrokerUnavailableError(TransportError):
    code = "broker_unavailable"


class NotConnectedError(TransportError):
    code = "not_connected"


class PublishError(TransportError):
    code = "publish_error"


class SubscribeError(TransportError):
    code = "subscribe_error"


class ReleaseRejectedError(FoglineError):
    """A release the agent refuses. ``reason`` is one of a small set of stable words:
    ``bad_signature``, ``expired``, ``rollback``, ``wrong_device_class``,
    ``hash_mismatch``, ``self_test_failed``, ``load_failed``, ``unknown_key``."""

    code = "release_rejected"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ArtifactError(FoglineError):
    code = "artifact_error"


class ModelError(FoglineError):
    code = "model_error"


class UnknownModelError(ModelError):
    code = "unknown_model"


class InvalidModelError(ModelError):
    code = "invalid_model"


class InferenceInputError(ModelError):
    code = "invalid_input"


class CapacityError(FoglineError):
    code = "over_capacity"


class BudgetExceededError(FoglineError):
    code = "budget_exceeded"


class CloudUnavailableError(FoglineError):
    code = "cloud_unavailable"


class RegistryError(FoglineError):
    code = "registry_error"


class TrainingError(FoglineError):
    code = "training_error"


class FleetError(FoglineError):
    code = "fleet_error"


class FleetStoreUnavailableError(FleetError):
    """Transient: the database is down, unreachable or locked; the same write may work
    later. Other fleet errors (a corrupt record, a newer schema) will not."""

    code = "fleet_store_unavailable"


class UnknownDeviceError(FleetError):
    code = "unknown_device"
