"""Hypothesis strategies derived from the protocol's pydantic models, and one hand-written
valid sample of every message type.

The strategies walk each model's field annotations (types, ``Field`` bounds, and the
named validators behind ``Identifier``, ``Sha256`` and friends), so a new message type
or field is covered without touching the tests; an annotation the walker does not know
fails loudly instead of being skipped.
"""

from __future__ import annotations

import base64
import math
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import numpy as np
import pytest
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from fogline.protocol import (
    DTYPES,
    MESSAGE_TYPES,
    ArtifactChunk,
    ChunkRequest,
    Command,
    DesiredModel,
    DesiredState,
    DeviceEvent,
    DeviceState,
    ErrorReply,
    Heartbeat,
    InferenceRequest,
    InferenceResponse,
    Message,
    ReleaseManifest,
    ReleaseVariant,
    SigningKey,
    Tensor,
    TensorSpec,
    TrustChain,
    issue_key_set,
    sign_desired,
    sign_release,
)

# Keep generated collections small: the point is structure, not volume.
MAX_COLLECTION = 3
MAX_TEXT = 24
MAX_BYTES = 64

IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
SHA256 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
CORRELATION_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
TENSOR_NAMES = st.from_regex(r"[A-Za-z0-9_.:/-]{1,128}", fullmatch=True)
REPLY_TOPICS = st.text(
    alphabet=st.characters(exclude_characters="+#\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=64,
)

PUBLIC_KEY_TEXTS = st.binary(min_size=32, max_size=32).map(
    lambda raw: "ed25519:" + base64.b64encode(raw).decode()
)

# Named validators in the models -> what a valid value looks like.
_VALIDATED: dict[str, st.SearchStrategy[str]] = {
    "_pydantic_id": IDS,
    "_sha256": SHA256,
    "_correlation": CORRELATION_IDS,
    "_reply_topic": REPLY_TOPICS,
    "_tensor_name": TENSOR_NAMES,
    "_public_key_text": PUBLIC_KEY_TEXTS,
}


@st.composite
def tensors(draw: st.DrawFn, max_elements: int = 16) -> Tensor:
    """A valid tensor: a whitelisted dtype, a small shape and exactly enough bytes."""
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(0, 3))
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    elements = math.prod(shape)
    if elements > max_elements:
        shape, elements = [max_elements], max_elements
    size = elements * np.dtype(dtype).itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    return Tensor(dtype=dtype, shape=shape, data=data)


def _flatten(metadata: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            flat.extend(_flatten(list(item.metadata)))
        else:
            flat.append(item)
    return flat


def _bounds(meta: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, at.Ge):
            out["ge"] = m.ge
        elif isinstance(m, at.Gt):
            out["gt"] = m.gt
        elif isinstance(m, at.Le):
            out["le"] = m.le
        elif isinstance(m, at.Lt):
            out["lt"] = m.lt
        elif isinstance(m, at.MinLen):
            out["min_length"] = m.min_length
        elif isinstance(m, at.MaxLen):
            out["max_length"] = m.max_length
    return out


def strategy_for(tp: Any, metadata: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """A strategy of valid python values for one annotation (plus its constraints)."""
    meta = _flatten(list(metadata or []))
    origin = get_origin(tp)
    if origin is Annotated:
        base, *more = get_args(tp)
        return strategy_for(base, meta + list(more))
    for m in meta:
        if isinstance(m, AfterValidator):
            name = getattr(m.func, "__name__", "")
            if name not in _VALIDATED:
                raise NotImplementedError(f"no strategy for validator {name}; add one")
            return _VALIDATED[name]
    bounds = _bounds(meta)
    if tp is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of(*(strategy_for(arg, meta) for arg in get_args(tp)))
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else None)
        high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else None)
        return st.integers(low, high)
    if tp is float:
        return st.floats(
            min_value=bounds.get("ge", bounds.get("gt")),
            max_value=bounds.get("le", bounds.get("lt")),
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
            allow_infinity=False,
        )
    if tp is str:
        return st.text(
            min_size=bounds.get("min_length", 0),
            max_size=min(bounds.get("max_length", MAX_TEXT), MAX_TEXT),
        )
    if tp is bytes:
        low = bounds.get("min_length", 0)
        return st.binary(min_size=low, max_size=max(low, min(bounds.get("max_length", 64), 64)))
    if origin is list:
        (item,) = get_args(tp)
        low = bounds.get("min_length", 0)
        high = max(low, min(bounds.get("max_length", MAX_COLLECTION), MAX_COLLECTION))
        return st.lists(strategy_for(item), min_size=low, max_size=high)
    if origin is dict:
        key, value = get_args(tp)
        low = bounds.get("min_length", 0)
        high = max(low, min(bounds.get("max_length", MAX_COLLECTION), MAX_COLLECTION))
        return st.dictionaries(strategy_for(key), strategy_for(value), min_size=low, max_size=high)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_strategy(tp)
    raise NotImplementedError(f"no strategy for annotation {tp!r}; add one")


def model_strategy(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Valid instances of a model: required fields always, defaulted ones sometimes."""
    if cls is Tensor:
        return tensors()
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in cls.model_fields.items():
        strategy = strategy_for(field.annotation, list(field.metadata))
        (required if field.is_required() else optional)[name] = strategy
    build: Callable[[dict[str, Any]], Any] = cls.model_validate
    return st.fixed_dictionaries(required, optional=optional).map(build)


MESSAGE_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    name: model_strategy(cls) for name, cls in sorted(MESSAGE_TYPES.items())
}
"""One strategy per wire message type, keyed by ``message_type``."""

ANY_MESSAGE: st.SearchStrategy[Message] = st.one_of(*MESSAGE_STRATEGIES.values())


def make_samples() -> dict[str, Message]:
    """One realistic, valid message of every type (tensors, nested models, options set)."""
    key = SigningKey.generate()
    sha = "ab" * 32
    spec = TensorSpec(name="input", dtype="float32", shape=[-1, 64])
    variant = ReleaseVariant(
        device_class="rpi4",
        quantization="int8-qdq",
        sha256=sha,
        size=123_456,
        chunk_size=65_536,
        inputs=[spec],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
    )
    example = Tensor.from_numpy(np.arange(64, dtype=np.float32).reshape(1, 64))
    manifest = ReleaseManifest(
        model="digits",
        version=3,
        created_at=1_700_000_000.0,
        expires_at=1_800_000_000.0,
        key_id=key.key_id,
        variants=[variant],
        example_input={"input": example},
        labels=[str(i) for i in range(10)],
        metadata={"trainer": "ray", "accuracy": "0.97"},
    )
    desired = DesiredState(
        scope="group",
        target="canary",
        sequence=7,
        issued_at=1_700_000_000.0,
        expires_at=1_800_000_000.0,
        key_id=key.key_id,
        models={"digits": DesiredModel(version=3, allow_rollback=True)},
    )
    new_key = SigningKey.generate()
    link = issue_key_set(1, [key.public_key, new_key.public_key], [key, new_key])
    samples: list[Message] = [
        link.key_set,
        link,
        TrustChain(links=[link, issue_key_set(2, [new_key.public_key], [new_key])]),
        manifest,
        sign_release(manifest, key),
        desired,
        sign_desired(desired, key),
        DeviceState(
            device_id="dev-1",
            status="online",
            at=1.5,
            device_class="rpi4",
            groups=["canary"],
            agent_version="0.1.0",
            key_set_version=2,
        ),
        Heartbeat(
            device_id="dev-1",
            device_class="rpi4",
            groups=["canary", "eu"],
            seq=42,
            at=1_700_000_000.25,
            uptime_s=12.5,
            interval_s=5.0,
            models={"digits": 3},
            requests=100,
            errors=1,
            edge_requests=80,
            cloud_requests=20,
            budgeted_requests=50,
            met_budget=49,
            latency_p50_ms=1.25,
            latency_p99_ms=9.5,
            offload_ratio=0.2,
            met_budget_ratio=0.98,
            breaker_state="half_open",
            cpu_percent=37.5,
            memory_mb=512.0,
        ),
        DeviceEvent(
            device_id="dev-1",
            kind="release_rejected",
            at=2.0,
            model="digits",
            version=4,
            reason="bad_signature",
            detail="signature does not verify",
        ),
        ChunkRequest(
            correlation_id="c-1",
            reply_to="fogline/v1/devices/dev-1/inbox/artifacts",
            sha256=sha,
            offset=65_536,
            length=65_536,
            device_id="dev-1",
        ),
        ArtifactChunk(
            correlation_id="c-1",
            sha256=sha,
            offset=0,
            total_size=10,
            chunk_sha256="cd" * 32,
            data=b"0123456789",
        ),
        ErrorReply(correlation_id="c-2", code="unknown_model", message="no model 'x'"),
        InferenceRequest(
            correlation_id="r-1",
            reply_to="fogline/v1/devices/dev-1/inbox/infer",
            model="digits",
            version=3,
            inputs={"input": example},
            deadline=1_700_000_001.0,
            device_id="dev-1",
        ),
        InferenceResponse(
            correlation_id="r-1",
            model="digits",
            version=3,
            outputs={"logits": Tensor.from_numpy(np.zeros((1, 10), dtype=np.float32))},
            service_ms=2.5,
        ),
        Command(
            correlation_id="k-1",
            device_id="dev-1",
            command="reload",
            args={"force": True, "retries": 3, "factor": 0.5, "reason": "test"},
            reply_to="fogline/v1/devices/dev-1/inbox/commands",
            issued_at=3.0,
        ),
    ]
    return {m.message_type: m for m in samples}


@pytest.fixture(scope="session")
def samples() -> dict[str, Message]:
    return make_samples()


@pytest.fixture(scope="session")
def message_strategies() -> dict[str, st.SearchStrategy[Any]]:
    """Test modules cannot import this conftest (importlib mode), so it is a fixture;
    draw from it with ``st.data()``."""
    return MESSAGE_STRATEGIES


@pytest.fixture(scope="session")
def any_message() -> st.SearchStrategy[Message]:
    return ANY_MESSAGE
