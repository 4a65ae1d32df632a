"""Runtime: hot swap under load, serving at restart before the broker is reachable,
shared sessions, input validation and admission control."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _release_kit import ArtifactServer, ReleaseKit, build_model, publish, sample_input

from fogline.edge import Admission, Agent, AgentConfig, SessionCache, _status
from fogline.edge._capacity import percentile
from fogline.edge._status import ProcessUsage, _resident_bytes
from fogline.protocol import CapacityError, InferenceInputError, free_port


def _release(kit: ReleaseKit, server: ArtifactServer, version: int, seed: int) -> None:
    data = build_model(seed=seed)
    server.add(data)
    publish(
        server._transport,
        kit.topics.release("digits", version),
        kit.release("digits", version, data),
    )


def test_hot_swap_under_load_has_zero_failures(
    kit: ReleaseKit, artifact_server: ArtifactServer, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(capacity={"max_in_flight": 4, "max_queue": 64})
    _release(kit, artifact_server, 1, seed=1)
    assert agent.wait_for_version("digits", 1, timeout=20)
    stop = threading.Event()
    failures: list[BaseException] = []
    versions: list[set[int]] = [set() for _ in range(4)]
    counts = [0] * 4

    def hammer(i: int) -> None:
        x = sample_input(seed=i)
        while not stop.is_set():
            try:
                r = agent.infer("digits", {"input": x}, budget_ms=5000)
                versions[i].add(r.version)
                counts[i] += 1
                assert r.outputs["logits"].shape == (1, 10)
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for version in (2, 3):
            _release(kit, artifact_server, version, seed=version)
            assert agent.wait_for_version("digits", version, timeout=20)
        # Requests may all have run before v3 went live: wait for enough after the last
        # swap that some surely started on v3 (at most 4 were in flight across it).
        target = max(2000, sum(counts) + 200)
        while sum(counts) < target and not failures:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert failures == []
    seen = set().union(*versions)
    assert {1, 3} <= seen
    assert agent.status().errors == 0


def test_restart_serves_installed_model_before_broker_is_reachable(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    config_factory: Callable[..., AgentConfig],
) -> None:
    first = agent_factory()
    _release(kit, artifact_server, 1, seed=1)
    assert first.wait_for_version("digits", 1, timeout=20)
    expected = first.infer("digits", {"input": sample_input()}).outputs["logits"]
    first.stop()
    dead = {
        "url": f"mqtt://127.0.0.1:{free_port()}",
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    second = agent_factory(config_factory(mqtt=dead))
    # No broker answers, yet the installed model serves at once.
    assert not second.connected
    result = second.infer("digits", {"input": sample_input()})
    assert result.version == 1
    np.testing.assert_array_equal(result.outputs["logits"], expected)


def test_session_cache_shares_sessions_between_agents(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    config_factory: Callable[..., AgentConfig],
) -> None:
    cache = SessionCache()
    a = Agent(config_factory("dev-a"), session_cache=cache)
    b = Agent(config_factory("dev-b"), session_cache=cache)
    for agent in (a, b):
        agent.start()
    try:
        _release(kit, artifact_server, 1, seed=1)
        assert a.wait_for_version("digits", 1, timeout=20)
        assert b.wait_for_version("digits", 1, timeout=20)
        assert a.model("digits").session is b.model("digits").session
        assert len(cache) == 1
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing"),
        ({"input": sample_input(), "extra": sample_input()}, "unknown"),
        ({"wrong": sample_input()}, "missing"),
        ({"input": sample_input().astype(np.float64)}, "float32"),
        ({"input": np.zeros((1, 1, 8), np.float32)}, "shape"),
        ({"input": np.zeros((1, 2, 8, 8), np.float32)}, "shape"),
        ({"input": [[1.0]]}, "numpy"),
    ],
)
def test_bad_inputs_raise_typed_errors(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    inputs: dict[str, Any],
    message: str,
) -> None:
    agent = agent_factory()
    _release(kit, artifact_server, 1, seed=1)
    assert agent.wait_for_version("digits", 1, timeout=20)
    with pytest.raises(InferenceInputError, match=message):
        agent.infer("digits", inputs)
    # Still healthy, and a batch of 3 (dynamic axis) works.
    assert agent.infer("digits", {"input": sample_input(batch=3)}).outputs["logits"].shape == (
        3,
        10,
    )
    assert agent.status().errors == 1


def test_admission_queues_within_budget_and_refuses_beyond() -> None:
    adm = Admission(max_in_flight=1, max_queue=1, default_max_wait_ms=50)
    adm.acquire(None)
    # Queue has room but no slot frees within the budget: refused, not stuck.
    with pytest.raises(CapacityError, match="within"):
        adm.acquire(20)
    # A waiter gets the slot as soon as it is released.
    got = threading.Event()

    def waiter() -> None:
        adm.acquire(5000)
        got.set()

    t = threading.Thread(target=waiter)
    t.start()
    while adm.queue_depth == 0:
        threading.Event().wait(0.001)
    # The queue (1) is full now: the next one is refused at once.
    with pytest.raises(CapacityError, match="queued"):
        adm.acquire(5000)
    adm.release("m", 1.0, 1.0, True)
    t.join(timeout=5)
    assert got.is_set()
    adm.release("m", 3.0, 3.0, True)
    snap = adm.snapshot()
    assert snap.in_flight == 0 and snap.queue_depth == 0 and snap.refused == 2
    assert adm.service_estimate_ms("m") is not None


def _queue_one(adm: Admission, order: list[int], i: int) -> threading.Thread:
    """Start a thread that waits for a slot, records its turn and gives the slot back;
    returns once it is queued."""

    def waiter() -> None:
        adm.acquire(5000)
        order.append(i)
        adm.release("m", 1.0, 1.0, True)

    depth = adm.queue_depth
    t = threading.Thread(target=waiter)
    t.start()
    while adm.queue_depth == depth:
        threading.Event().wait(0.001)
    return t


def test_admission_serves_waiters_first_come_first_served() -> None:
    adm = Admission(max_in_flight=1, max_queue=16, default_max_wait_ms=50)
    adm.acquire(None)
    order: list[int] = []
    threads = [_queue_one(adm, order, i) for i in range(8)]
    # A newcomer finds the slot busy and queues last, even if it asks as a slot frees.
    adm.release("m", 1.0, 1.0, True)
    adm.acquire(5000)
    order.append(99)
    adm.release("m", 1.0, 1.0, True)
    for t in threads:
        t.join(timeout=5)
    assert order == [*range(8), 99]
    snap = adm.snapshot()
    assert snap.in_flight == 0 and snap.queue_depth == 0 and snap.refused == 0


def test_admission_loses_no_slot_under_contention() -> None:
    # Many threads racing for two slots, some timing out: every slot comes back, and
    # every request either ran or was refused with a CapacityError.
    adm = Admission(max_in_flight=2, max_queue=64, default_max_wait_ms=50)
    ran, refused = [0], [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(200):
            try:
                adm.acquire(0.2 if (k + j) % 7 == 0 else 1000)
            except CapacityError:
                with lock:
                    refused[0] += 1
                continue
            with lock:
                ran[0] += 1
            adm.release("m", 0.01, 0.01, True)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert ran[0] + refused[0] == 16 * 200
    snap = adm.snapshot()
    assert snap.in_flight == 0 and snap.queue_depth == 0 and snap.refused == refused[0]
    # Both slots are free again.
    adm.acquire(None)
    adm.acquire(None)
    assert adm.in_flight == 2


def test_latency_percentiles_match_numpy_linear_definition() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 2048):
        values = sorted(rng.exponential(1.0, n).tolist())
        for q in (0.0, 50.0, 99.0, 100.0):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50.0) == 0.0
    admission = Admission(max_in_flight=1, max_queue=0, default_max_wait_ms=10)
    assert admission.snapshot().latency_p50_ms == 0.0
    for ms in (1.0, 2.0, 3.0, 4.0):
        admission.acquire(None)
        admission.release("m", ms, ms, True)
    snap = admission.snapshot()
    assert snap.latency_p50_ms == pytest.approx(2.5)
    assert snap.latency_p99_ms == pytest.approx(float(np.percentile([1, 2, 3, 4], 99)))


def test_process_usage_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    usage = ProcessUsage()
    assert sum(i * i for i in range(300_000)) > 0  # some CPU time between the samples
    cpu, mem = usage.sample()
    assert cpu > 0.0
    rss = psutil.Process().memory_info().rss / 1e6
    assert abs(mem - rss) < 0.1 * rss  # the same figure psutil reports
    # Without /proc: the peak RSS from getrusage, never below the current one.

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(path)

    monkeypatch.setattr(_status, "open", no_proc, raising=False)
    assert _resident_bytes() / 1e6 >= 0.9 * mem


# -- giving freed memory back (fogline-edge run) ----------------------------------------


def test_release_freed_heap_runs_on_glibc_and_is_a_noop_elsewhere() -> None:
    import os
    import sys

    from fogline.edge import _runtime

    on_glibc = sys.platform.startswith("linux") and (
        os.confstr("CS_GNU_LIBC_VERSION") or ""
    ).startswith("glibc")
    assert (_runtime.glibc() is not None) == on_glibc
    freed = _runtime.release_freed_heap()  # True only if glibc gave pages back
    assert isinstance(freed, bool)
    assert freed is False or on_glibc


def test_a_swap_trims_the_heap_once_the_replaced_model_is_freed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from fogline.edge import _runtime

    trims: list[int] = []
    monkeypatch.setattr(_runtime, "release_freed_heap", lambda: trims.append(1) or True)
    path = tmp_path / "m.onnx"
    path.write_bytes(build_model(seed=1))

    def load(version: int) -> _runtime.LoadedModel:
        return _runtime.load_model("digits", version, f"{version:064x}", path, threads=1)

    slot = _runtime.ModelSlot(load(1))
    assert slot.swap(load(2)) is not None  # off by default (simulated fleets)
    gc.collect()
    assert trims == []
    monkeypatch.setattr(_runtime, "_trim_after_swaps", False)
    _runtime.trim_heap_after_swaps()  # what fogline-edge run does
    in_flight = slot.swap(load(3))  # a request still holds the old model...
    gc.collect()
    assert trims == []
    assert in_flight is not None and in_flight.version == 2
    del in_flight  # ...until it finishes
    gc.collect()
    assert trims == [1]
