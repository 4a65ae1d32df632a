"""Cloud inference end to end: the edge's CloudClient and Router -> MQTT (real Mosquitto)
-> InferenceBridge -> Ray Serve (the shared local Ray) -> ONNX Runtime."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fogline.cloud.serving import (
    DeployedModel,
    InferenceBridge,
    OnnxRunner,
    ServedModel,
    ServingSettings,
    deploy_model,
    shutdown_serving,
)
from fogline.edge._breaker import CircuitBreaker
from fogline.edge._cloud_client import CloudClient
from fogline.edge._routing import (
    LocalResult,
    LocalState,
    Router,
    RoutingPolicy,
    RoutingSettings,
)
from fogline.protocol import (
    ErrorReply,
    InferenceRequest,
    Tensor,
    Topics,
    decode,
    encode,
)

pytestmark = pytest.mark.ray

IDLE = LocalState(queue_depth=0, service_ms=1.0)
BUSY = LocalState(queue_depth=200, in_flight=1, service_ms=1.0)  # ~200 ms local estimate


class CountingHandle:
    """Wraps the real Serve handle to count the calls the bridge makes."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.calls = 0
        self._lock = threading.Lock()

    def remote(self, inputs: dict[str, np.ndarray]) -> Any:
        with self._lock:
            self.calls += 1
        return self.handle.remote(inputs)


@pytest.fixture(scope="module")
def deployed(ray_session: Any, tiny: Any) -> Iterator[DeployedModel]:
    settings = ServingSettings(
        model="tiny", version=2, num_replicas=2, num_cpus=0.1, max_batch_size=8,
        batch_wait_timeout_ms=1.0,
    )
    try:
        yield deploy_model(settings, tiny.onnx)
    finally:
        shutdown_serving()  # leave no Serve behind for other test modules


@pytest.fixture
def topics() -> Topics:
    return Topics(prefix=f"test-{uuid.uuid4().hex[:8]}/v1")


@pytest.fixture
def stack(transports: Any, topics: Topics, deployed: DeployedModel) -> Iterator[dict[str, Any]]:
    counting = CountingHandle(deployed.handle)
    bridge = InferenceBridge(
        transports(), {"tiny": ServedModel(deployed.version, counting)}, topics
    )
    bridge.start()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.3)
    client = CloudClient(
        transports(), topics, "edge-1", breaker=breaker, probe_interval_s=0.1,
        probe_timeout_s=0.5, watch=["tiny"],
    )
    client.start()
    parts = {"bridge": bridge, "client": client, "counting": counting, "breaker": breaker}
    try:
        yield parts
    finally:
        client.close()
        parts["bridge"].close()


def local_path(tiny: Any, x: np.ndarray) -> LocalResult:
    return LocalResult({"probs": OnnxRunner(tiny.onnx).run({"x": x})["probs"]}, version=1)


def test_round_trip_through_serve_with_concurrent_batching(
    stack: dict[str, Any], tiny: Any
) -> None:
    client: CloudClient = stack["client"]
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: client.infer("tiny", {"x": x}, timeout_s=30), inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.outputs["probs"], tiny.reference(x), rtol=1e-5)
        assert result.version == 2
        assert result.service_ms > 0
    assert stack["counting"].calls == 24
    assert stack["bridge"].service_ms("tiny") is not None
    client.probe("tiny", timeout_s=5)
    assert client.service_ms("tiny") is not None


def test_expired_request_never_reaches_serve(
    stack: dict[str, Any], transports: Any, topics: Topics, tiny: Any
) -> None:
    edge = transports()
    replies: list[Any] = []
    edge.subscribe(topics.inbox("edge-x", "infer"), lambda m: replies.append(decode(m.payload)))
    time.sleep(0.2)
    request = InferenceRequest(
        correlation_id="expired", reply_to=topics.inbox("edge-x", "infer"), model="tiny",
        inputs={"x": Tensor.from_numpy(tiny.confident)}, deadline=time.time() - 0.5,
    )
    edge.publish(topics.infer_requests("tiny"), encode(request), qos=1)
    end = time.monotonic() + 10
    while not replies and time.monotonic() < end:
        time.sleep(0.01)
    assert isinstance(replies[0], ErrorReply) and replies[0].code == "deadline_exceeded"
    assert stack["counting"].calls == 0


def test_routes_to_the_cloud_only_when_the_local_queue_would_miss_the_budget(
    stack: dict[str, Any], tiny: Any
) -> None:
    client: CloudClient = stack["client"]
    client.probe("tiny", timeout_s=5)  # learn the round trip
    router = Router(RoutingSettings(default_budget_ms=1000), client)
    x = tiny.confident
    busy = router.route("tiny", {"x": x}, lambda: local_path(tiny, x), local=BUSY, budget_ms=100)
    idle = router.route("tiny", {"x": x}, lambda: local_path(tiny, x), local=IDLE, budget_ms=100)
    assert (busy.target, busy.version, busy.reason) == ("cloud", 2, "local_misses_budget")
    assert (idle.target, idle.version) == ("edge", 1)
    np.testing.assert_allclose(busy.outputs["probs"], idle.outputs["probs"], rtol=1e-5)
    assert router.stats.offload_ratio == 0.5


def test_a_device_class_without_a_local_variant_is_served_by_the_cloud(
    stack: dict[str, Any], tiny: Any
) -> None:
    router = Router(RoutingSettings(), stack["client"])

    def no_local() -> LocalResult:
        raise AssertionError("there is no local variant")

    results = [
        router.route("tiny", {"x": tiny.unsure}, no_local, local=LocalState(has_model=False))
        for _ in range(5)
    ]
    assert {r.target for r in results} == {"cloud"}
    assert router.stats.offload_ratio == 1.0


def test_cascade_asks_the_cloud_only_for_low_confidence(stack: dict[str, Any], tiny: Any) -> None:
    router = Router(
        RoutingSettings(policy=RoutingPolicy.CASCADE, cascade_threshold=0.9), stack["client"]
    )
    counting: CountingHandle = stack["counting"]
    sure = router.route("tiny", {"x": tiny.confident}, lambda: local_path(tiny, tiny.confident),
                        local=IDLE, budget_ms=5000)
    assert (sure.target, sure.escalated, counting.calls) == ("edge", False, 0)
    unsure = router.route("tiny", {"x": tiny.unsure}, lambda: local_path(tiny, tiny.unsure),
                          local=IDLE, budget_ms=5000)
    assert (unsure.target, unsure.escalated, counting.calls) == ("cloud", True, 1)


def test_cloud_stopped_mid_load_opens_the_breaker_and_recovers(
    stack: dict[str, Any], transports: Any, topics: Topics, deployed: DeployedModel, tiny: Any,
) -> None:
    client: CloudClient = stack["client"]
    breaker: CircuitBreaker = stack["breaker"]
    client.probe("tiny", timeout_s=5)
    budget, grace = 150.0, 25.0  # local estimate ~200 ms misses it
    router = Router(RoutingSettings(grace_ms=grace), client)
    x = tiny.confident

    def one() -> Any:
        return router.route("tiny", {"x": x}, lambda: local_path(tiny, x), local=BUSY,
                            budget_ms=budget)

    before = [one() for _ in range(3)]
    assert {r.target for r in before} == {"cloud"}
    stack["bridge"].close()  # the cloud goes away mid-load
    during = [one() for _ in range(12)]
    assert all(r.outputs["probs"].shape == (1, 3) for r in during)  # every request answered
    assert {r.target for r in during} == {"edge"}  # served locally
    assert breaker.snapshot().opened_count >= 1
    # Never far past budget + grace (a generous liveness bound, not a benchmark).
    assert max(r.latency_ms for r in during) < budget + grace + 2000
    fell_back = [r for r in during if r.fell_back]
    assert len(fell_back) < len(during)  # once open, the breaker skips the cloud at once

    counting = CountingHandle(deployed.handle)
    served = {"tiny": ServedModel(deployed.version, counting)}
    bridge = InferenceBridge(transports(), served, topics)
    bridge.start()
    stack["bridge"] = bridge
    end = time.monotonic() + 15
    while breaker.state != "closed" and time.monotonic() < end:
        time.sleep(0.05)  # half-open probes close it
    assert breaker.state == "closed"
    after = one()
    assert after.target == "cloud"
    assert counting.calls == 1

