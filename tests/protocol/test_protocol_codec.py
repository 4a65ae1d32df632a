"""The codec: every message type round-trips, and every way a payload can be wrong is
one clear DecodeError (never anything else)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fogline.protocol import (
    DEFAULT_MAX_PAYLOAD,
    DTYPES,
    MAX_TENSOR_ELEMENTS,
    MESSAGE_TYPES,
    Command,
    DecodeError,
    DeviceState,
    Heartbeat,
    InferenceRequest,
    Message,
    ProtocolError,
    Tensor,
    TensorError,
    decode,
    decode_envelope,
    encode,
)

ALL_TYPES = sorted(MESSAGE_TYPES)
_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def envelope(
    body: Any,
    *,
    kind: Any = "device_state",
    version: Any = 1,
    message_id: Any = "m-1",
    ts: Any = 1.0,
    **extra: Any,
) -> bytes:
    """Hand-built envelope bytes, so each field can be wrong on its own."""
    raw = {"type": kind, "v": version, "id": message_id, "ts": ts, "body": body, **extra}
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


def body_of(message: Message) -> dict[str, Any]:
    return message.model_dump(mode="python")


def state_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"device_id": "dev-1", "status": "online", "at": 1.0}
    body.update(changes)
    return body


def heartbeat_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": "dev-1",
        "device_class": "rpi4",
        "seq": 1,
        "at": 1.0,
        "uptime_s": 1.0,
        "interval_s": 5.0,
    }
    body.update(changes)
    return body


def decode_error(data: Any, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    assert info.value.message, "a DecodeError must say what is wrong"
    return info.value.message


# -- round trips -------------------------------------------------------------------------


def test_samples_cover_every_message_type(samples: dict[str, Message]) -> None:
    assert sorted(samples) == ALL_TYPES


@pytest.mark.parametrize("kind", ALL_TYPES)
@_SETTINGS
@given(data=st.data())
def test_every_message_type_round_trips(
    kind: str, data: st.DataObject, message_strategies: dict[str, st.SearchStrategy[Any]]
) -> None:
    message = data.draw(message_strategies[kind])
    sent_at = data.draw(st.floats(0, 4e9, allow_nan=False))
    encoded = encode(message, message_id="fixed-id", sent_at=sent_at)
    decoded = decode(encoded)
    assert type(decoded) is type(message)
    assert decoded == message
    # Stable bytes: re-encoding what we decoded gives the very same payload.
    assert encode(decoded, message_id="fixed-id", sent_at=sent_at) == encoded
    assert decode(encoded, MESSAGE_TYPES[kind]) == message


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_samples_round_trip_with_envelope(kind: str, samples: dict[str, Message]) -> None:
    message = samples[kind]
    env = decode_envelope(encode(message, message_id="abc123", sent_at=1234.5))
    assert env.message == message
    assert env.message_id == "abc123"
    assert env.sent_at == 1234.5
    assert env.schema_version == type(message).schema_version


def test_encode_fills_in_id_and_time(samples: dict[str, Message]) -> None:
    first = decode_envelope(encode(samples["device_state"]))
    second = decode_envelope(encode(samples["device_state"]))
    assert first.message_id != second.message_id
    assert len(first.message_id) == 32
    assert first.sent_at > 1_600_000_000


def test_integer_sent_at_still_decodes(samples: dict[str, Message]) -> None:
    env = decode_envelope(encode(samples["device_state"], sent_at=5))
    assert env.sent_at == 5.0 and isinstance(env.sent_at, float)
    # Other encoders may send whole seconds as an int.
    env = decode_envelope(envelope(state_body(), ts=7))
    assert env.sent_at == 7.0


@pytest.mark.parametrize("sent_at", [math.nan, math.inf, -math.inf, "now", True])
def test_encode_refuses_a_bad_sent_at(sent_at: Any, samples: dict[str, Message]) -> None:
    with pytest.raises(ProtocolError):
        encode(samples["device_state"], sent_at=sent_at)


def test_encode_refuses_an_overlong_message_id(samples: dict[str, Message]) -> None:
    with pytest.raises(ProtocolError):
        encode(samples["device_state"], message_id="x" * 65)


def test_encode_of_an_unvalidated_message_is_a_protocol_error() -> None:
    # model_construct skips validation; encode must still not leak OverflowError.
    bogus = Heartbeat.model_construct(**{**heartbeat_body(), "seq": 1 << 70})
    with pytest.raises(ProtocolError):
        encode(bogus)


def test_out_of_range_integers_are_refused_at_construction() -> None:
    with pytest.raises(ValidationError):
        Heartbeat(**heartbeat_body(seq=1 << 63))
    # In a union with float, a huge int is accepted as a float: it still encodes.
    command = Command(
        correlation_id="c", device_id="d", command="x", args={"n": 1 << 64}, issued_at=1.0
    )
    assert decode(encode(command)) == command


# -- the envelope ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nope", "", 7, None, b"device_state", ["device_state"]])
def test_unknown_message_type(kind: Any) -> None:
    assert "unknown message type" in decode_error(envelope(state_body(), kind=kind))


@pytest.mark.parametrize("version", [0, 2, 99, -1, "1", 1.0, True, None])
def test_wrong_schema_version(version: Any) -> None:
    assert "schema version" in decode_error(envelope(state_body(), version=version))


@pytest.mark.parametrize("message_id", ["", "x" * 65, 12, None, b"id"])
def test_bad_message_id(message_id: Any) -> None:
    assert "id" in decode_error(envelope(state_body(), message_id=message_id))


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, "1.0", None, True, [1.0]])
def test_bad_sent_at(ts: Any) -> None:
    assert "ts" in decode_error(envelope(state_body(), ts=ts))


def test_envelope_with_an_unknown_key() -> None:
    assert "unknown ['extra']" in decode_error(envelope(state_body(), extra=1))


@pytest.mark.parametrize("missing", ["type", "v", "id", "ts", "body"])
def test_envelope_with_a_missing_key(missing: str) -> None:
    raw = {"type": "device_state", "v": 1, "id": "m", "ts": 1.0, "body": state_body()}
    del raw[missing]
    assert f"missing ['{missing}']" in decode_error(msgpack.packb(raw))


def test_envelope_with_non_string_keys() -> None:
    raw = {1: "x", "type": "device_state", "v": 1, "id": "m", "ts": 1.0, "body": {}}
    decode_error(msgpack.packb(raw))


@pytest.mark.parametrize("value", [[1, 2], "device_state", None, 1, 1.5, b"bytes", True])
def test_non_map_envelope(value: Any) -> None:
    assert "envelope must be a map" in decode_error(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("body", [[], "body", None, 1, b"x"])
def test_non_map_body(body: Any) -> None:
    assert "body must be a map" in decode_error(envelope(body))


def test_expected_type_mismatch(samples: dict[str, Message]) -> None:
    data = encode(samples["device_state"])
    assert "expected a heartbeat" in decode_error(data, expected=Heartbeat)
    assert decode(data, DeviceState) == samples["device_state"]


# -- the body ----------------------------------------------------------------------------


def test_unknown_field() -> None:
    message = decode_error(envelope(state_body(surprise=1)))
    assert "surprise" in message


def test_unknown_nested_field(samples: dict[str, Message]) -> None:
    body = body_of(samples["release_manifest"])
    body["variants"][0]["extra"] = "x"
    assert "extra" in decode_error(envelope(body, kind="release_manifest"))


@pytest.mark.parametrize("field", ["device_id", "status", "at"])
def test_missing_field(field: str) -> None:
    body = state_body()
    del body[field]
    assert field in decode_error(envelope(body))


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("device_state", state_body(device_id=7), "device_id"),  # int for str
        ("device_state", state_body(device_id=b"dev-1"), "device_id"),  # bytes for str
        ("device_state", state_body(at="1.0"), "at"),  # str for float
        ("device_state", state_body(status=True), "status"),
        ("device_state", state_body(groups="canary"), "groups"),  # str for list
        ("heartbeat", heartbeat_body(seq=True), "seq"),  # bool for int
        ("heartbeat", heartbeat_body(seq=1.0), "seq"),  # float for int
        ("heartbeat", heartbeat_body(seq="1"), "seq"),
        ("heartbeat", heartbeat_body(models=[["digits", 1]]), "models"),  # list for map
        ("heartbeat", heartbeat_body(models={"digits": True}), "models"),
        ("heartbeat", heartbeat_body(seq=-1), "seq"),  # below the bound
        ("heartbeat", heartbeat_body(offload_ratio=1.5), "offload_ratio"),
        ("heartbeat", heartbeat_body(seq=1 << 63), "seq"),  # beyond int64
    ],
)
def test_wrong_types_and_values(kind: str, body: dict[str, Any], field: str) -> None:
    assert field in decode_error(envelope(body, kind=kind))


def test_str_for_bytes(samples: dict[str, Message]) -> None:
    body = body_of(samples["artifact_chunk"])
    body["data"] = "0123456789"
    assert "data" in decode_error(envelope(body, kind="artifact_chunk"))


def test_bad_signature_length(samples: dict[str, Message]) -> None:
    body = body_of(samples["signed_release"])
    body["signature"] = body["signature"][:63]
    assert "signature" in decode_error(envelope(body, kind="signed_release"))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["at", "uptime_s", "latency_p99_ms", "cpu_percent"])
def test_nan_and_infinity_are_refused(field: str, value: float) -> None:
    assert field in decode_error(envelope(heartbeat_body(**{field: value}), kind="heartbeat"))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_in_a_union_field(value: float, samples: dict[str, Message]) -> None:
    body = body_of(samples["command"])
    body["args"]["factor"] = value
    assert "args" in decode_error(envelope(body, kind="command"))


def test_bad_ids_inside_messages() -> None:
    with pytest.raises(ValidationError):
        DeviceState(device_id="+", status="online", at=1.0)
    for bad in ["+", "#", "a/b", "", "x" * 65, "-a", "dév"]:
        assert "device_id" in decode_error(envelope(state_body(device_id=bad)))


# -- sizes, nesting, ext types, garbage ----------------------------------------------------


def test_oversize_payload(samples: dict[str, Message]) -> None:
    data = encode(samples["heartbeat"])
    assert decode(data, max_size=len(data)) == samples["heartbeat"]
    assert "at most" in decode_error(data, max_size=len(data) - 1)
    big = data + b"\x00" * (DEFAULT_MAX_PAYLOAD + 1 - len(data))
    assert "at most" in decode_error(big)


def test_deep_nesting_of_the_whole_payload() -> None:
    # msgpack.packb refuses to build this, so it is written by hand: 5000 nested arrays.
    decode_error(b"\x91" * 5000 + b"\x00")
    decode_error(b"\x81\xa1k" * 5000 + b"\x00")  # 5000 nested maps


def test_deep_nesting_inside_the_body() -> None:
    nested: Any = 0
    for _ in range(100):
        nested = [nested]
    assert "nests deeper" in decode_error(envelope(state_body(groups=nested)))


def test_ext_types_are_refused() -> None:
    ext = msgpack.ExtType(5, b"payload")
    assert "extension" in decode_error(envelope(state_body(agent_version=ext)))
    assert "extension" in decode_error(envelope(state_body(), ts=msgpack.ExtType(1, b"x")))


def test_msgpack_timestamps_are_refused() -> None:
    stamp = msgpack.Timestamp(1_700_000_000, 0)
    decode_error(envelope(state_body(), ts=stamp))
    decode_error(envelope(state_body(at=stamp)))


def test_every_truncation_of_a_valid_payload(samples: dict[str, Message]) -> None:
    data = encode(samples["release_manifest"])
    for end in range(len(data)):
        decode_error(data[:end])


def test_trailing_bytes_are_refused(samples: dict[str, Message]) -> None:
    decode_error(encode(samples["device_state"]) + b"\x00")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"hello world",
        b"\xff" * 32,
        b"\x00",
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion pairs
        b"\xdb\xff\xff\xff\xff",  # a 4 GiB string
    ],
)
def test_garbage(data: bytes) -> None:
    decode_error(data)


@pytest.mark.parametrize("data", ["a string", None, 42, ["list"], {"type": "device_state"}])
def test_non_bytes_input(data: Any) -> None:
    assert "bytes" in decode_error(data)


def test_bytearray_and_memoryview_are_accepted(samples: dict[str, Message]) -> None:
    data = encode(samples["device_state"])
    assert decode(bytearray(data)) == samples["device_state"]
    assert decode(memoryview(data)) == samples["device_state"]


def test_memoryview_size_is_counted_in_bytes() -> None:
    view = memoryview(np.zeros(100, dtype=np.int32).tobytes()).cast("i")
    assert len(view) == 100 and view.nbytes == 400
    assert "400 bytes" in decode_error(view, max_size=200)


# -- tensors -----------------------------------------------------------------------------


def tensor_request(tensor: dict[str, Any]) -> bytes:
    body = {
        "correlation_id": "r-1",
        "reply_to": "fogline/v1/devices/d/inbox/infer",
        "model": "digits",
        "inputs": {"input": tensor},
    }
    return envelope(body, kind="inference_request")


def test_tensor_round_trip_values() -> None:
    for dtype in DTYPES:
        array = (np.arange(24) % 2).astype(dtype).reshape(2, 3, 4)
        tensor = Tensor.from_numpy(array)
        request = InferenceRequest(
            correlation_id="r",
            reply_to="fogline/v1/devices/d/inbox/infer",
            model="m",
            inputs={"x": tensor},
        )
        back = decode(encode(request), InferenceRequest).inputs["x"].to_numpy()
        assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
        np.testing.assert_array_equal(back, array)


def test_tensor_from_numpy_normalizes_layout_and_byte_order() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian and not C-contiguous
    tensor = Tensor.from_numpy(array)
    assert tensor.dtype == "int32" and tensor.shape == [3, 2]
    np.testing.assert_array_equal(tensor.to_numpy(), array)


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "object", "datetime64[s]", "U3"])
def test_tensor_dtype_off_the_whitelist(dtype: str) -> None:
    with pytest.raises(TensorError):
        Tensor.from_numpy(np.zeros(2, dtype=dtype))


def test_tensor_from_something_else() -> None:
    with pytest.raises(TensorError):
        Tensor.from_numpy([1.0, 2.0])  # type: ignore[arg-type]


def test_tensor_with_too_many_elements() -> None:
    with pytest.raises(TensorError):
        Tensor.from_numpy(np.zeros(MAX_TENSOR_ELEMENTS + 1, dtype=np.bool_))
    message = decode_error(
        tensor_request({"dtype": "uint8", "shape": [2048, 2049], "data": b""})
    )
    assert "elements" in message


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 15}, "bytes"),
        ({"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 17}, "bytes"),
        ({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}, "dtype"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "shape"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\x00" * 4}, "shape"),
        ({"dtype": "float32", "shape": [0, 1 << 40], "data": b""}, "shape"),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, "data"),
        ({"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "extra": 1}, "extra"),
        ({"dtype": "float32", "shape": "1", "data": b"\x00" * 4}, "shape"),
    ],
)
def test_bad_tensors(tensor: dict[str, Any], words: str) -> None:
    assert words in decode_error(tensor_request(tensor))


def test_decode_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode(b"\xc1")
