"""Bridge-side batching: the ModelBatcher on its own (an asyncio loop and a fake Serve
call), the bridge batching over a real Mosquitto, and ``infer_batch`` on real Serve."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fogline.cloud.serving import (
    BatchServeHandle,
    InferenceBridge,
    ModelBatcher,
    OnnxRunner,
    ServedModel,
    ServeModelHandle,
    ServingSettings,
    deploy_model,
    shutdown_serving,
)
from fogline.edge._cloud_client import CloudClient
from fogline.protocol import InferenceInputError, Topics

Inputs = dict[str, np.ndarray]


def x(value: float) -> Inputs:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


class GatedCall:
    """A fake Serve batch call that waits for ``gate`` and echoes its inputs."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        self.short = False

    async def __call__(self, batch: list[Inputs]) -> Any:
        self.batches.append([float(b["x"][0, 0]) for b in batch])
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        results = [{"outputs": b, "service_ms": 1.0} for b in batch]
        return results[:-1] if self.short else results


async def settle() -> None:
    for _ in range(10):  # let the batcher's task reach the call
        await asyncio.sleep(0)


def test_batcher_sends_at_once_when_idle_and_batches_while_busy() -> None:
    async def scenario() -> None:
        call = GatedCall()
        batcher = ModelBatcher(call, max_batch=3, max_calls=1)
        first = batcher.submit(x(0), 5.0)
        await settle()
        assert call.batches == [[0.0]]  # idle: no waiting for company
        rest = [batcher.submit(x(i), 5.0) for i in range(1, 6)]
        rest[1].cancel()  # abandoned by its waiter: never sent
        call.gate.set()
        results = await asyncio.gather(first, *[f for f in rest if not f.cancelled()])
        assert [float(r["outputs"]["x"][0, 0]) for r in results] == [0, 1, 3, 4, 5]
        assert call.batches == [[0.0], [1.0, 3.0, 4.0], [5.0]]  # max_batch 3
        assert (batcher.calls, batcher.batched, batcher.skipped) == (3, 5, 1)

    asyncio.run(scenario())


def test_batcher_expected_time_follows_its_queue() -> None:
    async def scenario() -> None:
        call = GatedCall()
        batcher = ModelBatcher(call, max_batch=8, max_calls=1)
        batcher.overhead_s, batcher.item_s = 0.010, 0.002
        assert batcher.expected_s() == pytest.approx(0.012)  # a free slot: one call
        first = batcher.submit(x(0), 5.0)
        await settle()
        waiting = [batcher.submit(x(i), 5.0) for i in range(1, 4)]
        # Busy: wait for the call in flight, then one call carrying the 3 queued and us.
        assert batcher.expected_s() == pytest.approx(0.012 + 0.010 + 4 * 0.002)
        call.gate.set()
        await asyncio.gather(first, *waiting)
        # The backlog is gone: the estimate drops at once, to the median recent call
        # (one slow call does not move it), then to the fastest once idle past
        # fresh_s (the figures may be left from a burst that made clients stop).
        batcher._recent_calls.clear()
        batcher._recent_calls.extend([0.004, 0.005, 0.900])
        assert batcher.expected_s() == pytest.approx(0.005)
        batcher.fresh_s = 0.0
        assert batcher.expected_s() == pytest.approx(
            min(batcher._fastest_call, *batcher._recent_calls)
        )
        # After a long overload every recent call was slow: idle, the batcher still
        # answers with the fastest call it made, or devices would never come back.
        fastest = batcher._fastest_call
        batcher._recent_calls.clear()
        batcher._recent_calls.extend([0.300] * 32)
        assert batcher.expected_s() == pytest.approx(fastest) and fastest < 0.3
        batcher.fresh_s = 60.0
        assert batcher.expected_s() == pytest.approx(0.300)  # not idle: the recent median

    asyncio.run(scenario())


def test_batcher_fails_every_waiter_with_the_calls_error() -> None:
    async def scenario() -> None:
        call = GatedCall()
        call.fail = RuntimeError("replica died")
        call.gate.set()
        batcher = ModelBatcher(call, max_batch=8, max_calls=1)
        futures = [batcher.submit(x(i), 5.0) for i in range(3)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        call.fail, call.short = None, True  # a result count that does not match
        with pytest.raises(TypeError):
            await batcher.submit(x(9), 5.0)

    asyncio.run(scenario())


def test_batcher_does_not_send_what_cannot_meet_its_deadline() -> None:
    async def scenario() -> None:
        call = GatedCall()
        call.gate.set()
        batcher = ModelBatcher(call, max_batch=8, max_calls=1, alpha=0.0)
        await batcher.submit(x(0), 5.0)
        batcher.overhead_s, batcher.item_s = 0.5, 0.1  # a call takes >= 0.6 s (alpha 0: kept)
        batcher._recent_calls.clear()
        batcher._recent_calls.extend([0.6] * 4)  # ... and so did the recent ones
        batcher.fresh_s = 60.0
        hopeless = batcher.submit(x(1), 0.2)
        with pytest.raises(TimeoutError):
            await hopeless
        assert call.batches == [[0.0]]  # never reached "Serve"
        assert batcher.skipped == 1
        # Time-bounded batches: the oldest has 1.05 s, so 5 fit (0.5 + 5 * 0.1), not 6.
        call.gate.clear()
        busy = batcher.submit(x(2), 5.0)
        await settle()
        queued = [batcher.submit(x(10 + i), 1.05 if i == 0 else 5.0) for i in range(7)]
        call.gate.set()
        await asyncio.gather(busy, *queued)
        assert [len(b) for b in call.batches[2:]] == [5, 2]

    asyncio.run(scenario())


def test_batcher_one_stalled_call_does_not_refuse_what_typical_calls_can_meet() -> None:
    async def scenario() -> None:
        call = GatedCall()
        call.gate.set()
        batcher = ModelBatcher(call, max_batch=8, max_calls=1, fresh_s=60.0)
        for i in range(5):
            await batcher.submit(x(i), 5.0)  # fast calls
        # One stall (a pause in Ray) drives the running averages past a budgeted
        # request's deadline; nothing but calls would bring them down.
        batcher.overhead_s, batcher.item_s = 0.5, 0.1
        batcher._recent_calls.append(0.6)
        result = await batcher.submit(x(7), 0.2)
        assert float(result["outputs"]["x"][0, 0]) == 7.0 and batcher.skipped == 0
        # After an overload every recent call was slow; once no call has finished for
        # fresh_s, the fastest call decides, so budgeted requests get through again.
        batcher._recent_calls.clear()
        batcher._recent_calls.extend([0.6] * 32)
        batcher.overhead_s, batcher.item_s = 0.5, 0.1
        with pytest.raises(TimeoutError):
            await batcher.submit(x(8), 0.2)  # fresh: the slow calls are the cloud's state
        batcher.fresh_s = 0.0
        result = await batcher.submit(x(9), 0.2)
        assert float(result["outputs"]["x"][0, 0]) == 9.0 and batcher.skipped == 1

    asyncio.run(scenario())


def test_batcher_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ModelBatcher(GatedCall(), max_batch=0)


class BatchHandle:
    """Stands in for ServeModelHandle: real ONNX, counts calls, answers after a delay."""

    def __init__(self, onnx: bytes, delay_s: float = 0.05) -> None:
        self.runner = OnnxRunner(onnx)
        self.delay_s = delay_s
        self.single_calls = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def remote(self, inputs: Inputs) -> Any:
        raise AssertionError("a batch handle is called with batches")

    def remote_batch(self, batch: list[Inputs]) -> Any:
        with self._lock:
            self.batch_sizes.append(len(batch))

        async def run() -> list[dict[str, Any]]:
            await asyncio.sleep(self.delay_s)
            replies: list[dict[str, Any]] = []
            for outcome in self.runner.run_batch(batch):
                if isinstance(outcome, Exception):
                    replies.append({"error": outcome.code, "message": outcome.message})
                else:
                    replies.append({"outputs": outcome, "service_ms": 1.0})
            return replies

        return run()


@pytest.fixture
def topics() -> Topics:
    return Topics(prefix=f"test-{uuid.uuid4().hex[:8]}/v1")


def test_bridge_batches_concurrent_requests_into_few_serve_calls(
    transports: Any, topics: Topics, tiny: Any
) -> None:
    handle = BatchHandle(tiny.onnx)
    assert isinstance(handle, BatchServeHandle)
    bridge = InferenceBridge(
        transports(), {"tiny": ServedModel(3, handle)}, topics, max_concurrent_batches=1
    )
    client = CloudClient(transports(), topics, "dev-b", probe_interval_s=0)
    try:
        bridge.start()
        client.start()
        rng = np.random.default_rng(5)
        inputs = [rng.normal(size=(1 + i % 2, 4)).astype(np.float32) for i in range(24)]
        bad = np.zeros((1, 7), dtype=np.float32)

        def one(value: np.ndarray) -> Any:
            try:
                return client.infer("tiny", {"x": value}, timeout_s=10)
            except InferenceInputError as exc:
                return exc

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, [*inputs, bad]))
        for value, result in zip(inputs, results, strict=False):
            np.testing.assert_allclose(result.outputs["probs"], tiny.reference(value), rtol=1e-5)
            assert result.version == 3
        assert isinstance(results[-1], InferenceInputError)  # its own error, nobody else's
        assert sum(handle.batch_sizes) == 25
        assert len(handle.batch_sizes) < 25  # batched while a call was in flight
        assert bridge.stats.forwarded == 25
        assert bridge.stats.serve_calls == len(handle.batch_sizes)
    finally:
        client.close()
        bridge.close()


@pytest.fixture(scope="module")
def served(ray_session: Any, tiny: Any) -> Iterator[Any]:
    settings = ServingSettings(model="tiny", version=5, num_cpus=0.1, max_batch_size=4)
    try:
        yield deploy_model(settings, tiny.onnx)
    finally:
        shutdown_serving()


@pytest.mark.ray
def test_infer_batch_on_serve_answers_each_request(served: Any, tiny: Any) -> None:
    handle = served.handle
    assert isinstance(handle, ServeModelHandle) and isinstance(handle, BatchServeHandle)
    batch = [{"x": tiny.confident}, {"x": np.zeros((1, 7), np.float32)}, {"x": tiny.unsure}]
    replies = handle.remote_batch(batch).result(timeout_s=60)
    assert [("error" in r) for r in replies] == [False, True, False]
    assert replies[1]["error"] == "invalid_input"
    np.testing.assert_allclose(replies[2]["outputs"]["probs"], tiny.reference(tiny.unsure),
                               rtol=1e-5)
    assert replies[0]["service_ms"] > 0
    # The per-request path still works on the same deployment.
    single = handle.remote({"x": tiny.confident}).result(timeout_s=60)
    np.testing.assert_allclose(single["outputs"]["probs"], tiny.reference(tiny.confident),
                               rtol=1e-5)
    assert handle.remote_batch([]).result(timeout_s=60) == []


@pytest.mark.ray
def test_serve_calls_by_value_by_default_and_by_reference_on_request(
    served: Any, tiny: Any
) -> None:
    by_value = served.handle
    by_reference = ServeModelHandle(by_value.serve_handle, by_value=False)
    assert ServingSettings(model="m", version=1).by_value_calls
    for handle, expected in ((by_value, False), (by_reference, True)):
        response = handle.remote({"x": tiny.unsure})
        assert response.by_reference is expected  # Serve's gRPC path, or actor calls
        np.testing.assert_allclose(response.result(timeout_s=60)["outputs"]["probs"],
                                   tiny.reference(tiny.unsure), rtol=1e-5)
        batch = handle.remote_batch([{"x": tiny.confident}]).result(timeout_s=60)
        np.testing.assert_allclose(batch[0]["outputs"]["probs"],
                                   tiny.reference(tiny.confident), rtol=1e-5)
