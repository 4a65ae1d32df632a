"""msgpack encoding with a versioned envelope, and a strict decoder.

An encoded message is a msgpack map::

    {"type": "<message_type>", "v": <schema version>, "id": "<uuid hex>",
     "ts": <sent-at, epoch seconds>, "body": {...fields...}}

:func:`decode` raises :class:`DecodeError` for anything that is not exactly such a map
holding a valid message, and nothing else ever escapes it. There is no pickle and no
extension type anywhere.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgpack
from pydantic import ValidationError

from ._errors import DecodeError, ProtocolError
from ._messages import MESSAGE_TYPES, Message

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAX_DEPTH",
    "Envelope",
    "canonical_bytes",
    "decode",
    "decode_envelope",
    "encode",
]

DEFAULT_MAX_PAYLOAD = 8 << 20  # 8 MiB: a chunk or a batch of inputs, with room
MAX_DEPTH = 16  # our deepest schema nests 6 levels
_MAX_ID = 64
_ENVELOPE_KEYS = frozenset({"type", "v", "id", "ts", "body"})

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Envelope:
    """A decoded message with its envelope fields."""

    message: Message
    message_id: str
    sent_at: float
    schema_version: int


def encode(
    message: Message, *, message_id: str | None = None, sent_at: float | None = None
) -> bytes:
    """Encode ``message`` in a fresh envelope.

    Raises :class:`ProtocolError` if the result could not be decoded again: a bad
    ``message_id`` or ``sent_at``, or a message built without validation
    (``model_construct``) holding values msgpack cannot carry.
    """
    message_id = message_id or uuid.uuid4().hex
    if not isinstance(message_id, str) or len(message_id) > _MAX_ID:
        raise ProtocolError(f"message id must be a string of 1-{_MAX_ID} characters")
    ts = time.time() if sent_at is None else sent_at
    # The decoder insists on a float; an int timestamp would make the message undecodable.
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ProtocolError(f"sent_at must be a finite number, got {ts!r}")
    envelope = {
        "type": message.message_type,
        "v": message.schema_version,
        "id": message_id,
        "ts": float(ts),
        "body": message.model_dump(mode="python"),
    }
    try:
        return msgpack.packb(envelope, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {message.message_type}: {exc}") from None


def canonical_bytes(message: Message) -> bytes:
    """Deterministic bytes of a message's content, for signing: keys sorted at every
    level, floats as float64, and the message type as a domain separator."""
    body = _sorted(message.model_dump(mode="python"))
    try:
        packed: bytes = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {message.message_type}: {exc}") from None
    return b"fogline-sig-v1\x00" + message.message_type.encode() + b"\x00" + packed


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


@overload
def decode(data: bytes, expected: type[M], *, max_size: int = ...) -> M: ...
@overload
def decode(data: bytes, expected: None = None, *, max_size: int = ...) -> Message: ...
def decode(
    data: bytes, expected: type[Message] | None = None, *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> Message:
    """Decode one message. With ``expected``, any other message type is a DecodeError."""
    return decode_envelope(data, expected, max_size=max_size).message


def decode_envelope(
    data: bytes, expected: type[Message] | None = None, *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> Envelope:
    """Decode one message and its envelope fields."""
    try:
        return _decode(data, expected, max_size)
    except DecodeError:
        raise
    except Exception as exc:  # the decoder's contract: only DecodeError escapes
        raise DecodeError(f"undecodable payload: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes, expected: type[Message] | None, max_size: int) -> Envelope:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
    # len() of a memoryview counts items, not bytes: an int32 view is 4x its len().
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise DecodeError(f"payload is {size} bytes; at most {max_size}")
    if not size:
        raise DecodeError("payload is empty")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
        )
    except DecodeError:
        raise
    except Exception as exc:
        # Some msgpack errors (StackError for deep nesting) carry no text of their own.
        raise DecodeError(
            f"payload is not valid msgpack ({type(exc).__name__}: {exc or 'no detail'})"
        ) from None
    if not isinstance(raw, dict):
        raise DecodeError(f"envelope must be a map, got {type(raw).__name__}")
    keys = set(raw)
    if keys != _ENVELOPE_KEYS:
        missing, extra = sorted(_ENVELOPE_KEYS - keys), sorted(map(str, keys - _ENVELOPE_KEYS))
        raise DecodeError(f"envelope fields wrong: missing {missing}, unknown {extra}")
    kind, version, message_id, sent_at, body = (raw[k] for k in ("type", "v", "id", "ts", "body"))
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise DecodeError(f"unknown message type {kind!r}")
    cls = MESSAGE_TYPES[kind]
    if expected is not None and cls is not expected:
        raise DecodeError(f"expected a {expected.message_type} message, got {kind}")
    if type(version) is not int or version != cls.schema_version:
        raise DecodeError(f"{kind}: unsupported schema version {version!r}")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= _MAX_ID:
        raise DecodeError(f"envelope id must be a string of 1-{_MAX_ID} characters")
    # Other encoders may send a whole-second timestamp as an int; bool is never a time.
    if type(sent_at) not in (float, int) or not math.isfinite(sent_at):
        raise DecodeError("envelope ts must be a finite number")
    if not isinstance(body, dict):
        raise DecodeError(f"{kind}: body must be a map")
    _check_depth(body)
    try:
        message = cls.model_validate(body, strict=True)
    except ValidationError as exc:
        raise DecodeError(f"invalid {kind}: {_summarize(exc)}") from None
    return Envelope(message, message_id, float(sent_at), version)


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension types are not allowed (got type {code})")


def _check_depth(body: dict[str, Any]) -> None:
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DecodeError(f"payload nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
