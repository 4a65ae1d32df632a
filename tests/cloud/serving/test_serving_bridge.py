"""The MQTT inference bridge and the edge's CloudClient, over a real Mosquitto. Serve is
stood in for by a counting async handle running the real ONNX model (the Ray Serve
round trip is in test_serving_ray.py)."""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import numpy as np
import pytest

from fogline.cloud.serving import PROBE_INPUT, InferenceBridge, OnnxRunner, ServedModel
from fogline.edge._breaker import CircuitBreaker
from fogline.edge._cloud_client import PROBE_INPUT as EDGE_PROBE_INPUT
from fogline.edge._cloud_client import CloudClient
from fogline.protocol import (
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    ErrorReply,
    InferenceInputError,
    InferenceRequest,
    Message,
    MqttMessage,
    MqttTransport,
    Tensor,
    Topics,
    UnknownModelError,
    decode,
    encode,
)


class CountingHandle:
    """Stands in for a Serve handle: counts calls, runs the real model."""

    def __init__(self, onnx: bytes, delay_s: float = 0.0) -> None:
        self.runner = OnnxRunner(onnx)
        self.delay_s = delay_s
        self.calls = 0

    def remote(self, inputs: dict[str, np.ndarray]) -> Any:
        self.calls += 1

        async def run() -> dict[str, Any]:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            start = time.perf_counter()
            outcome = self.runner.run_batch([inputs])[0]
            if isinstance(outcome, Exception):
                return {"error": outcome.code, "message": outcome.message}  # type: ignore[attr-defined]
            return {"outputs": outcome, "service_ms": (time.perf_counter() - start) * 1000}

        return run()


@pytest.fixture
def topics() -> Topics:
    return Topics(prefix=f"test-{uuid.uuid4().hex[:8]}/v1")


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register bridges/clients to close at teardown, even on failure."""
    things: list[Any] = []

    def register(thing: Any) -> Any:
        things.append(thing)
        return thing

    try:
        yield register
    finally:
        for thing in reversed(things):
            thing.close()


def make_bridge(
    transport: MqttTransport, topics: Topics, handle: Any, **kw: Any
) -> InferenceBridge:
    served = {"tiny": ServedModel(version=4, handle=handle)}
    bridge = InferenceBridge(transport, served, topics, **kw)
    bridge.start()
    return bridge


def inbox_collector(transport: MqttTransport, topics: Topics, device: str) -> queue.Queue[Message]:
    got: queue.Queue[Message] = queue.Queue()

    def on_message(msg: MqttMessage) -> None:
        got.put(decode(msg.payload))

    transport.subscribe(topics.inbox(device, "infer"), on_message)
    time.sleep(0.2)  # let the SUBACK land before publishing
    return got


def test_probe_constant_is_the_same_on_both_sides() -> None:
    assert PROBE_INPUT == EDGE_PROBE_INPUT


def test_round_trip_and_probe(transports: Any, topics: Topics, tiny: Any, closing: Any) -> None:
    handle = CountingHandle(tiny.onnx)
    bridge = closing(make_bridge(transports(), topics, handle))
    client = closing(CloudClient(transports(), topics, "dev-1", probe_interval_s=0))
    client.start()
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    result = client.infer("tiny", {"x": x}, timeout_s=5)
    np.testing.assert_allclose(result.outputs["probs"], tiny.reference(x), rtol=1e-5)
    assert result.version == 4
    assert result.service_ms > 0
    assert client.rtt_ms is not None and client.service_ms("tiny") is not None
    calls = handle.calls
    rtt = client.probe("tiny", timeout_s=5)
    assert rtt > 0
    assert handle.calls == calls  # probes never reach Serve
    assert bridge.stats.probes == 1
    state = client.state("tiny")
    assert state.available and state.serves_model


def test_expired_request_is_answered_without_calling_serve(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    handle = CountingHandle(tiny.onnx)
    bridge = closing(make_bridge(transports(), topics, handle))
    edge = transports()
    got = inbox_collector(edge, topics, "dev-2")
    request = InferenceRequest(
        correlation_id="late-1", reply_to=topics.inbox("dev-2", "infer"), model="tiny",
        inputs={"x": Tensor.from_numpy(tiny.confident)}, deadline=time.time() - 1.0,
    )
    edge.publish(topics.infer_requests("tiny"), encode(request), qos=1)
    reply = got.get(timeout=10)
    assert isinstance(reply, ErrorReply)
    assert (reply.correlation_id, reply.code) == ("late-1", "deadline_exceeded")
    assert handle.calls == 0
    assert bridge.stats.expired == 1


def test_malformed_requests_are_answered_or_dropped_and_the_bridge_keeps_serving(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    handle = CountingHandle(tiny.onnx)
    bridge = closing(make_bridge(transports(), topics, handle))
    edge = transports()
    got = inbox_collector(edge, topics, "dev-3")
    inbox = topics.inbox("dev-3", "infer")
    good = encode(InferenceRequest(
        correlation_id="ok-1", reply_to=inbox, model="tiny",
        inputs={"x": Tensor.from_numpy(tiny.confident)},
    ))
    raw = msgpack.unpackb(good, raw=False)

    def variant(**body: Any) -> bytes:
        return msgpack.packb({**raw, "body": {**raw["body"], **body}}, use_bin_type=True)  # type: ignore[no-any-return]

    topic = topics.infer_requests("tiny")
    # Dropped: nothing to answer.
    for payload in (b"", b"\xc1garbage", msgpack.packb([1, 2, 3]), variant(reply_to="evil/topic"),
                    variant(correlation_id="bad id!")):
        edge.publish(topic, payload, qos=1)
    # Answered with decode_error: the reply topic and correlation id can be read.
    edge.publish(topic, variant(correlation_id="bad-tensor", inputs={"x": {"dtype": "float32",
                 "shape": [1, 4], "data": b"\x00"}}), qos=1)
    edge.publish(topic, variant(correlation_id="extra-field", surprise=1), qos=1)
    edge.publish(topics.infer_requests("other"), variant(correlation_id="wrong-topic"), qos=1)
    # Unknown model and a version that is not served.
    unknown = variant(correlation_id="unknown", model="nope")
    edge.publish(topics.infer_requests("nope"), unknown, qos=1)
    edge.publish(topic, variant(correlation_id="old-version", version=1), qos=1)
    # Bad input for the model: answered by "Serve" with invalid_input.
    edge.publish(topic, variant(correlation_id="bad-shape", inputs={
        "x": {"dtype": "float32", "shape": [1, 2], "data": b"\x00" * 8}}), qos=1)
    edge.publish(topic, good, qos=1)

    replies: dict[str, Message] = {}
    while len(replies) < 7:
        message = got.get(timeout=10)
        replies[message.correlation_id] = message  # type: ignore[attr-defined]
    codes = {k: getattr(v, "code", "ok") for k, v in replies.items()}
    assert codes == {
        "bad-tensor": "decode_error",
        "extra-field": "decode_error",
        "wrong-topic": "decode_error",
        "unknown": "unknown_model",
        "old-version": "unknown_model",
        "bad-shape": "invalid_input",
        "ok-1": "ok",
    }
    assert bridge.stats.dropped == 5
    assert bridge.stats.malformed == 8
    assert handle.calls == 2  # only bad-shape and ok-1 reached the model


def test_client_translates_error_replies(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    closing(make_bridge(transports(), topics, CountingHandle(tiny.onnx)))
    client = closing(CloudClient(transports(), topics, "dev-4", probe_interval_s=0))
    client.start()
    with pytest.raises(UnknownModelError):
        client.infer("missing", {"x": tiny.confident}, timeout_s=5)
    assert not client.state("missing").serves_model
    with pytest.raises(InferenceInputError):
        client.infer("tiny", {"x": np.zeros((1, 7), dtype=np.float32)}, timeout_s=5)
    assert client.breaker.state == "closed"  # the path is fine; the requests were bad


def test_slow_serve_gives_deadline_exceeded_and_capacity_refusals(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    handle = CountingHandle(tiny.onnx, delay_s=0.6)
    closing(make_bridge(transports(), topics, handle, max_in_flight=1))
    client = closing(CloudClient(transports(), topics, "dev-5", probe_interval_s=0,
                                 breaker=CircuitBreaker(failure_threshold=100)))
    client.start()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.infer, "tiny", {"x": tiny.confident}, timeout_s=0.3)
        time.sleep(0.1)
        refused = pool.submit(client.infer, "tiny", {"x": tiny.confident}, timeout_s=5)
        with pytest.raises(CapacityError):
            refused.result()
        with pytest.raises((BudgetExceededError, CloudUnavailableError)):
            slow.result()
    # A busy cloud is not a down cloud: the breaker stays closed, the estimate rises.
    assert client.breaker.state == "closed"
    assert client.breaker.snapshot().consecutive_failures == 0
    assert client.stats.busy == 2
    assert (client.service_ms("tiny") or 0.0) >= 250.0


def test_timeouts_while_the_cloud_answers_others_do_not_trip_the_breaker(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    handle = CountingHandle(tiny.onnx, delay_s=0.25)
    # The bridge's clock lags, so it never answers a 0.1 s request "deadline exceeded"
    # just before the client's own timeout: that race is not what this test is about.
    closing(make_bridge(transports(), topics, handle, clock=lambda: time.time() - 0.5))
    breaker = CircuitBreaker(failure_threshold=2)
    client = closing(CloudClient(transports(), topics, "dev-busy", probe_interval_s=0,
                                 breaker=breaker))
    client.start()
    stop = time.monotonic() + 1.5
    answered: list[int] = []

    def patient() -> None:  # keeps the cloud answering: one request every 30 ms
        with ThreadPoolExecutor(16) as pool:
            futures = []
            while time.monotonic() < stop:
                futures.append(pool.submit(client.infer, "tiny", {"x": tiny.confident},
                                           timeout_s=5))
                time.sleep(0.03)
            answered.extend(f.result().version for f in futures)

    with ThreadPoolExecutor(1) as background:
        stream = background.submit(patient)
        time.sleep(0.4)  # answers are flowing now
        for _ in range(4):
            with pytest.raises(CloudUnavailableError, match="busy"):
                client.infer("tiny", {"x": tiny.confident}, timeout_s=0.1)
        stream.result()
    assert answered and set(answered) == {4}
    assert breaker.state == "closed"
    assert client.stats.busy == 4
    assert breaker.snapshot().opened_count == 0
    # The busy spell left a wide deviation; probes (nothing else goes now) fade it.
    wide = client.state("tiny").deviation_ms
    assert wide > 0
    for _ in range(5):
        client.probe("tiny", timeout_s=5)
    assert client.state("tiny").deviation_ms < wide / 3


def test_breaker_opens_when_the_bridge_stops_and_closes_when_it_returns(
    transports: Any, topics: Topics, tiny: Any, closing: Any, wait_until: Any
) -> None:
    handle = CountingHandle(tiny.onnx)
    bridge = make_bridge(transports(), topics, handle)
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.3)
    client = closing(CloudClient(transports(), topics, "dev-6", breaker=breaker,
                                 probe_interval_s=0.1, probe_timeout_s=0.3, watch=["tiny"]))
    client.start()
    client.infer("tiny", {"x": tiny.confident}, timeout_s=5)
    bridge.close()
    for _ in range(2):
        with pytest.raises(CloudUnavailableError):
            client.infer("tiny", {"x": tiny.confident}, timeout_s=0.2)
    assert breaker.snapshot().opened_count >= 1
    # While open, a call is refused at once instead of waiting on a dead cloud.
    if breaker.state == "open":
        with pytest.raises(CloudUnavailableError, match="breaker"):
            client.infer("tiny", {"x": tiny.confident}, timeout_s=5)
    bridge = closing(make_bridge(transports(), topics, handle))
    wait_until(lambda: breaker.state == "closed", timeout_s=15)  # a half-open probe closed it
    result = client.infer("tiny", {"x": tiny.confident}, timeout_s=5)
    assert result.version == 4


def test_shared_subscription_replicas_answer_each_request_once(
    transports: Any, topics: Topics, tiny: Any, closing: Any
) -> None:
    handles = [CountingHandle(tiny.onnx), CountingHandle(tiny.onnx)]
    for handle in handles:
        closing(make_bridge(transports(), topics, handle, shared_group="cloud-infer"))
    client = closing(CloudClient(transports(), topics, "dev-7", probe_interval_s=0))
    client.start()
    time.sleep(0.2)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: client.infer("tiny", {"x": tiny.unsure}, timeout_s=10), range(24)
        ))
    assert len(results) == 24
    assert sum(h.calls for h in handles) == 24
    assert all(h.calls > 0 for h in handles)
    time.sleep(0.2)
    assert client.stats.stray_replies == 0  # nobody answered twice
