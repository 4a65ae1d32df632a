"""Every message that crosses the wire, as strict pydantic v2 models.

Each concrete message has a ``message_type`` used in the envelope (see ``_codec``). All
models forbid unknown fields, accept no type coercion and reject NaN and infinity.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ._ids import Identifier
from ._tensors import DType, Tensor

__all__ = [
    "MAX_CHUNK_SIZE",
    "MESSAGE_TYPES",
    "ArtifactChunk",
    "BreakerState",
    "ChunkRequest",
    "Command",
    "CorrelationId",
    "DesiredModel",
    "DesiredState",
    "DeviceEvent",
    "DeviceState",
    "ErrorReply",
    "EventKind",
    "Heartbeat",
    "InferenceRequest",
    "InferenceResponse",
    "KeySet",
    "KeySignature",
    "Message",
    "ReleaseManifest",
    "ReleaseVariant",
    "ReplyTopic",
    "Sha256",
    "SignedDesiredState",
    "SignedKeySet",
    "SignedRelease",
    "TensorSpec",
    "TrustChain",
]

MAX_CHUNK_SIZE = 1 << 20  # 1 MiB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CORRELATION = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def _sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("must be 64 lowercase hex digits")
    return value


def _correlation(value: str) -> str:
    if not _CORRELATION.fullmatch(value):
        raise ValueError("must be 1-64 characters of letters, digits, '_' or '-'")
    return value


def _reply_topic(value: str) -> str:
    if not value or len(value) > 256 or any(c in value for c in "+#\x00"):
        raise ValueError("must be a concrete topic of at most 256 characters, no wildcards")
    return value


def _tensor_name(value: str) -> str:
    if not _TENSOR_NAME.fullmatch(value):
        raise ValueError("tensor names are 1-128 characters of letters, digits and _.:/-")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256)]
CorrelationId = Annotated[str, AfterValidator(_correlation)]
ReplyTopic = Annotated[str, AfterValidator(_reply_topic)]
TensorName = Annotated[str, AfterValidator(_tensor_name)]
ShortText = Annotated[str, Field(max_length=2048)]
Label = Annotated[str, Field(max_length=128)]
Timestamp = Annotated[float, Field(ge=0)]
# Integers stay within int64 so that every message encodes (msgpack stops at 64 bits)
# and fits SQLite and JSON consumers unchanged.
INT64_MAX = (1 << 63) - 1
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Version = Annotated[int, Field(ge=1, le=INT64_MAX)]
Size = Annotated[int, Field(gt=0, le=INT64_MAX)]
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Ratio = Annotated[float, Field(ge=0, le=1)]
BreakerState = Literal["closed", "open", "half_open"]

MESSAGE_TYPES: dict[str, type[Message]] = {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Message(_Strict):
    """Base of every top-level message. Subclasses set ``message_type``."""

    message_type: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("message_type")
        if name is not None:
            if name in MESSAGE_TYPES:
                raise TypeError(f"message type {name!r} is defined twice")
            MESSAGE_TYPES[name] = cls


# -- releases ------------------------------------------------------------------------------


class TensorSpec(_Strict):
    """One model input or output. ``-1`` in ``shape`` marks a dynamic axis."""

    name: TensorName
    dtype: DType
    shape: Annotated[list[Annotated[int, Field(ge=-1, le=INT64_MAX)]], Field(max_length=8)]


class ReleaseVariant(_Strict):
    """One artifact of a release, built for one device class."""

    device_class: Identifier
    quantization: Identifier
    sha256: Sha256
    size: Size
    chunk_size: Annotated[int, Field(gt=0, le=MAX_CHUNK_SIZE)]
    inputs: Annotated[list[TensorSpec], Field(min_length=1, max_length=64)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1, max_length=64)]


class ReleaseManifest(Message):
    """What a model release is; signed as a whole (see :class:`SignedRelease`)."""

    message_type: ClassVar[str] = "release_manifest"

    model: Identifier
    version: Version
    created_at: Timestamp
    expires_at: Timestamp
    key_id: Identifier
    variants: Annotated[list[ReleaseVariant], Field(min_length=1, max_length=64)]
    example_input: dict[TensorName, Tensor] | None = None
    labels: Annotated[list[Label], Field(max_length=4096)] | None = None
    metadata: Annotated[dict[Identifier, ShortText], Field(max_length=64)] = {}

    def variant_for(self, device_class: str) -> ReleaseVariant | None:
        return next((v for v in self.variants if v.device_class == device_class), None)


class SignedRelease(Message):
    """A release manifest with an ed25519 signature over its canonical bytes."""

    message_type: ClassVar[str] = "signed_release"

    manifest: ReleaseManifest
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]


class DesiredModel(_Strict):
    version: Version
    allow_rollback: bool = False


class DesiredState(Message):
    """Which model versions devices in a scope should run. Agents merge the fleet, group
    and device scopes, device winning over group over fleet."""

    message_type: ClassVar[str] = "desired_state"

    scope: Literal["fleet", "group", "device"]
    target: Identifier | None = None
    sequence: Count
    issued_at: Timestamp
    expires_at: Timestamp | None = None
    key_id: Identifier
    models: Annotated[dict[Identifier, DesiredModel], Field(max_length=256)]


class SignedDesiredState(Message):
    message_type: ClassVar[str] = "signed_desired_state"

    desired: DesiredState
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]


# -- signing keys ------------------------------------------------------------------------------

_PUBLIC_KEY_TEXT = re.compile(r"ed25519:[A-Za-z0-9+/]{43}=")


def _public_key_text(value: str) -> str:
    if not _PUBLIC_KEY_TEXT.fullmatch(value):
        raise ValueError("must be an ed25519 public key as 'ed25519:<base64 of 32 bytes>'")
    return value


PublicKeyText = Annotated[str, AfterValidator(_public_key_text)]


class KeySet(Message):
    """The cloud keys agents trust from ``version`` on. An agent's configured keys are
    version 0; see :mod:`fogline.protocol._trust_chain` for how a set is adopted."""

    message_type: ClassVar[str] = "key_set"

    version: Version
    issued_at: Timestamp
    keys: Annotated[list[PublicKeyText], Field(min_length=1, max_length=16)]


class KeySignature(_Strict):
    key_id: Identifier
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]


class SignedKeySet(Message):
    message_type: ClassVar[str] = "signed_key_set"

    key_set: KeySet
    signatures: Annotated[list[KeySignature], Field(min_length=1, max_length=16)]


class TrustChain(Message):
    """Every key set the cloud has issued, oldest first: retained on the fleet keys
    topic, so an agent that missed some rotations still walks to the newest set."""

    message_type: ClassVar[str] = "trust_chain"

    links: Annotated[list[SignedKeySet], Field(min_length=1, max_length=1024)]


# -- device reporting --------------------------------------------------------------------------


class DeviceState(Message):
    """Retained online/offline state; the agent's last will publishes ``offline``."""

    message_type: ClassVar[str] = "device_state"

    device_id: Identifier
    status: Literal["online", "offline"]
    at: Timestamp
    device_class: Identifier | None = None
    groups: Annotated[list[Identifier], Field(max_length=32)] = []
    agent_version: Annotated[str, Field(max_length=64)] = ""
    # The key set the agent trusts (0: its configured keys); None from older agents.
    key_set_version: Count | None = None


class Heartbeat(Message):
    """Periodic health report. Counters are cumulative since the agent started."""

    message_type: ClassVar[str] = "heartbeat"

    device_id: Identifier
    device_class: Identifier
    groups: Annotated[list[Identifier], Field(max_length=32)] = []
    seq: Count
    at: Timestamp
    uptime_s: Annotated[float, Field(ge=0)]
    interval_s: Annotated[float, Field(gt=0)]
    models: Annotated[dict[Identifier, Count], Field(max_length=256)] = {}
    requests: Count = 0
    errors: Count = 0
    edge_requests: Count = 0
    cloud_requests: Count = 0
    budgeted_requests: Count = 0
    met_budget: Count = 0
    latency_p50_ms: Annotated[float, Field(ge=0)] = 0.0
    latency_p99_ms: Annotated[float, Field(ge=0)] = 0.0
    queue_depth: Count = 0
    in_flight: Count = 0
    offload_ratio: Ratio = 0.0
    met_budget_ratio: Ratio = 1.0
    breaker_state: BreakerState = "closed"
    cpu_percent: Annotated[float, Field(ge=0)] = 0.0
    memory_mb: Annotated[float, Field(ge=0)] = 0.0
    telemetry_dropped: Count = 0


EventKind = Literal[
    "install_succeeded",
    "install_failed",
    "release_rejected",
    "rollback",
    "desired_rejected",
    "keys_updated",
    "keys_rejected",
    "agent_started",
    "agent_stopping",
]


class DeviceEvent(Message):
    """Something that happened on a device, such as an install and its outcome."""

    message_type: ClassVar[str] = "device_event"

    device_id: Identifier
    kind: EventKind
    at: Timestamp
    model: Identifier | None = None
    version: Version | None = None
    reason: Annotated[str, Field(max_length=64)] = ""
    detail: ShortText = ""


# -- artifacts ------------------------------------------------------------------------------


class ChunkRequest(Message):
    """Ask the artifact service for ``length`` bytes of an artifact from ``offset``.

    With ``multicast`` the requester is subscribed to ``artifacts/{sha256}/chunks`` and
    the service may answer there, once for every device that asked for the same piece
    within a short window, instead of on ``reply_to``. Such a reply's
    ``correlation_id`` is not the requester's: it matches on sha256 and offset.
    """

    message_type: ClassVar[str] = "chunk_request"

    correlation_id: CorrelationId
    reply_to: ReplyTopic
    sha256: Sha256
    offset: Count
    length: Annotated[int, Field(gt=0, le=MAX_CHUNK_SIZE)]
    device_id: Identifier | None = None
    multicast: bool = False


class ArtifactChunk(Message):
    """A piece of an artifact, carrying its own hash so it is verified on arrival."""

    message_type: ClassVar[str] = "artifact_chunk"

    correlation_id: CorrelationId
    sha256: Sha256
    offset: Count
    total_size: Size
    chunk_sha256: Sha256
    data: Annotated[bytes, Field(max_length=MAX_CHUNK_SIZE)]


class ErrorReply(Message):
    """The answer to a request that failed. ``code`` is a :class:`FoglineError` code."""

    message_type: ClassVar[str] = "error_reply"

    correlation_id: CorrelationId
    code: Identifier
    message: ShortText


# -- inference -------------------------------------------------------------------------------


class InferenceRequest(Message):
    """Inference offloaded to the cloud. ``deadline`` is an absolute epoch time; work
    whose deadline has passed is answered with an error and not run."""

    message_type: ClassVar[str] = "inference_request"

    correlation_id: CorrelationId
    reply_to: ReplyTopic
    model: Identifier
    version: Version | None = None
    inputs: Annotated[dict[TensorName, Tensor], Field(min_length=1, max_length=64)]
    deadline: Timestamp | None = None
    device_id: Identifier | None = None


class InferenceResponse(Message):
    message_type: ClassVar[str] = "inference_response"

    correlation_id: CorrelationId
    model: Identifier
    version: Version
    outputs: Annotated[dict[TensorName, Tensor], Field(max_length=64)]
    service_ms: Annotated[float, Field(ge=0)]


class Command(Message):
    """An instruction to one device, answered on ``reply_to`` if given."""

    message_type: ClassVar[str] = "command"

    correlation_id: CorrelationId
    device_id: Identifier
    command: Identifier
    args: Annotated[dict[Identifier, ShortText | Int64 | float | bool], Field(max_length=64)] = {}
    reply_to: ReplyTopic | None = None
    issued_at: Timestamp
