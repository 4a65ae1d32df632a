"""Decoder robustness: random bytes and mutated valid payloads of every message type.

Each call either returns a Message or raises DecodeError, nothing else. Whatever the
decoder accepts must encode again (no half-valid object escapes). Well over 10,000
cases per run: a fast seeded loop, plus hypothesis for shrinking and variety.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline.protocol import MESSAGE_TYPES, DecodeError, Message, decode, encode

RANDOM_CASES = 4_000
MUTATIONS_PER_TYPE = 600


def check(data: bytes) -> bool:
    """Decode ``data``; True if it decoded. Anything but DecodeError fails the test."""
    try:
        message = decode(data)
    except DecodeError as exc:
        assert exc.message
        return False
    assert isinstance(message, Message)
    encode(message)  # what the decoder accepts is a real, encodable message
    return True


def _flip_bit(rng: random.Random, data: bytearray) -> None:
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)


def _replace_byte(rng: random.Random, data: bytearray) -> None:
    # Bias towards msgpack's type and length markers, which stress the parser most.
    markers = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xCA, 0xCB, 0xCF, 0xD3, 0xD9,
               0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xD4, 0xC7, 0x90, 0x80, 0xA0, 0xFF]
    value = rng.choice(markers) if rng.random() < 0.5 else rng.randrange(256)
    data[rng.randrange(len(data))] = value


def _truncate(rng: random.Random, data: bytearray) -> None:
    del data[rng.randrange(len(data)) :]


def _insert(rng: random.Random, data: bytearray) -> None:
    i = rng.randrange(len(data) + 1)
    data[i:i] = rng.randbytes(rng.randrange(1, 9))


def _delete(rng: random.Random, data: bytearray) -> None:
    i = rng.randrange(len(data))
    del data[i : i + rng.randrange(1, 9)]


def _duplicate(rng: random.Random, data: bytearray) -> None:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 33))
    data[j:j] = data[i:j]


MUTATORS: list[Callable[[random.Random, bytearray], None]] = [
    _flip_bit,
    _replace_byte,
    _truncate,
    _insert,
    _delete,
    _duplicate,
]


def mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randrange(1, 4)):
        if not data:
            break
        rng.choice(MUTATORS)(rng, data)
    return bytes(data)


def test_random_bytes_only_raise_decode_error() -> None:
    rng = random.Random(20240601)
    decoded = 0
    for case in range(RANDOM_CASES):
        # Mostly short inputs, some long ones; a few start like a real envelope.
        length = rng.choice([rng.randrange(16), rng.randrange(16, 256), rng.randrange(256, 4096)])
        data = rng.randbytes(length)
        if case % 4 == 0:
            data = b"\x85" + data  # a 5-entry map header, the envelope's shape
        decoded += check(data)
    assert decoded == 0  # random bytes are never a valid message


def test_mutated_payloads_only_raise_decode_error(samples: dict[str, Message]) -> None:
    rng = random.Random(42)
    total = 0
    for kind in sorted(MESSAGE_TYPES):
        payload = encode(samples[kind], message_id="fuzz", sent_at=1.0)
        for _ in range(MUTATIONS_PER_TYPE):
            check(mutate(rng, payload))
            total += 1
    assert total + RANDOM_CASES >= 10_000


def test_spliced_payloads_only_raise_decode_error(samples: dict[str, Message]) -> None:
    rng = random.Random(7)
    payloads = [encode(m) for m in samples.values()]
    for _ in range(500):
        a, b = rng.sample(payloads, 2)
        cut_a, cut_b = rng.randrange(len(a)), rng.randrange(len(b))
        check(a[:cut_a] + b[cut_b:])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_hypothesis_random_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_mutations(data: st.DataObject, any_message: st.SearchStrategy[Any]) -> None:
    payload = bytearray(encode(data.draw(any_message)))
    for _ in range(data.draw(st.integers(1, 4))):
        if not payload:
            break
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, len(payload) - 1))
        if op == "flip":
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            payload[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del payload[i:]
        elif op == "insert":
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del payload[i : i + data.draw(st.integers(1, 8))]
    check(bytes(payload))


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_unmutated_samples_decode(kind: str, samples: dict[str, Message]) -> None:
    # The control group: the fuzz inputs start from payloads that really are valid.
    assert check(encode(samples[kind]))
