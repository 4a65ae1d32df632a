"""Hybrid routing through the real ``Agent.infer``: a real Mosquitto, a real edge agent
with a real ONNX Runtime model installed from a signed release, and cloud inference on
the shared local Ray (Serve deployment + ``InferenceBridge``), set up and torn down as
``tests/cloud/serving/test_serving_ray.py`` does.

The device's local variant is deliberately slow (~20 ms: a chain of 512x512 matmuls
whose result is multiplied by zero), the cloud's is the same classifier without that
chain, so both answer the same logits and the local queue can really miss a budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit

from _release_kit import ArtifactServer, Observer, ReleaseKit, publish

from fogline.cloud.serving import (
    DeployedModel,
    InferenceBridge,
    ServedModel,
    ServingSettings,
    deploy_model,
    shutdown_serving,
)
from fogline.edge import Agent, AgentConfig, load_config
from fogline.protocol import (
    CloudUnavailableError,
    Heartbeat,
    InferenceInputError,
    MqttSettings,
    MqttTransport,
    Topics,
    UnknownModelError,
)

pytestmark = pytest.mark.ray

MODEL = "digits"
CLOUD_VERSION = 7  # the cloud serves v7, the device installs v1: answers say which ran
CONFIDENT = np.zeros((1, 1, 8, 8), dtype=np.float32)
CONFIDENT[0, 0, 0, 0] = 3.0  # logits 12 vs 0: top-1 ~1.0
UNSURE = np.zeros((1, 1, 8, 8), dtype=np.float32)  # all logits 0: top-1 0.1


def build_classifier(heavy: int = 0, size: int = 512) -> bytes:
    """``logits[j] = 4 * pixel[j]`` for the first 10 pixels. ``heavy`` adds that many
    ``size``-square matmuls whose result is added times zero: slow, same answer."""
    w = np.zeros((64, 10), np.float32)
    for j in range(10):
        w[j, j] = 4.0
    inits = [numpy_helper.from_array(w, "W")]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits0" if heavy else "logits"]),
    ]
    if heavy:
        inits += [
            numpy_helper.from_array(np.array(1.0 / size, np.float32), "scale"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array([1, size // 64, size // 64], np.int64), "reps"),
            numpy_helper.from_array(np.array([2], np.int64), "ax2"),
            numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        ]
        nodes += [
            helper.make_node("Unsqueeze", ["flat", "ax2"], ["col"]),
            helper.make_node("Unsqueeze", ["flat", "ax1"], ["row"]),
            helper.make_node("MatMul", ["col", "row"], ["outer"]),
            helper.make_node("Tile", ["outer", "reps"], ["m0"]),
        ]
        prev = "m0"
        for i in range(heavy):
            nodes += [
                helper.make_node("MatMul", [prev, "m0"], [f"p{i}"]),
                helper.make_node("Mul", [f"p{i}", "scale"], [f"m{i + 1}"]),
            ]
            prev = f"m{i + 1}"
        nodes += [
            helper.make_node("ReduceMean", [prev], ["red"], keepdims=0, axes=[1, 2]),
            helper.make_node("Unsqueeze", ["red", "ax1"], ["red2"]),
            helper.make_node("Mul", ["red2", "zero"], ["nil"]),
            helper.make_node("Add", ["logits0", "nil"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "routing_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def deployed(ray_session: Any) -> Iterator[DeployedModel]:
    settings = ServingSettings(
        model=MODEL,
        version=CLOUD_VERSION,
        num_replicas=1,
        num_cpus=0.1,
        max_batch_size=8,
        batch_wait_timeout_ms=1.0,
    )
    try:
        deployed = deploy_model(settings, build_classifier())
        for _ in range(3):  # the first calls set up Serve's routing in this process: slow
            deployed.handle.remote({"input": CONFIDENT}).result(timeout_s=60)
        yield deployed
    finally:
        shutdown_serving()  # leave no Serve behind for other test modules


class Cloud:
    """The cloud side of one test: the bridge (stoppable, restartable) over Serve."""

    def __init__(self, settings: MqttSettings, topics: Topics, deployed: DeployedModel) -> None:
        self.settings, self.topics, self.deployed = settings, topics, deployed
        self.transports: list[MqttTransport] = []
        self.bridge: InferenceBridge | None = None
        self.forwarded = 0  # Serve calls by bridges already closed

    def start(self) -> InferenceBridge:
        transport = MqttTransport(self.settings, client_id=f"bridge-{uuid.uuid4().hex[:8]}")
        self.transports.append(transport)
        transport.connect()
        served = {MODEL: ServedModel(self.deployed.version, self.deployed.handle)}
        self.bridge = InferenceBridge(transport, served, self.topics)
        self.bridge.start()
        return self.bridge

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.close()
            self.forwarded += self.bridge.stats.forwarded
            self.bridge = None

    @property
    def serve_calls(self) -> int:
        return self.forwarded + (self.bridge.stats.forwarded if self.bridge else 0)

    def close(self) -> None:
        self.stop()
        for transport in self.transports:
            transport.close()


@pytest.fixture
def env(
    mqtt_settings: MqttSettings, tmp_path: Path, deployed: DeployedModel
) -> Iterator[dict[str, Any]]:
    topics = Topics(f"fogline-routing/{uuid.uuid4().hex[:10]}")
    kit = ReleaseKit(topics)
    server = ArtifactServer(mqtt_settings, topics).start()
    cloud = Cloud(mqtt_settings, topics, deployed)
    agents: list[Agent] = []
    observers: list[Observer] = []

    def make_agent(device_id: str = "edge-1", **overrides: Any) -> Agent:
        routing = {
            "probe_interval_s": 0.1,
            "probe_timeout_s": 0.5,
            "breaker_failures": 2,
            "breaker_cooldown_s": 0.3,
            **overrides.pop("routing", {}),
        }
        base: dict[str, Any] = {
            "device_id": device_id,
            "mqtt": mqtt_settings.model_dump(),
            "topic_prefix": topics.prefix,
            "trusted_keys": [kit.public_key],
            "data_dir": str(tmp_path / device_id),
            "heartbeat_interval_s": 0.2,
            "http": {"enabled": False},
            "models": [MODEL],
            "capacity": {"max_in_flight": 1, "max_queue": 64},
            "routing": routing,
            **overrides,
        }
        config: AgentConfig = load_config(env={}, **base)
        agent = Agent(config)
        agents.append(agent)
        agent.start()
        return agent

    def observe(device_id: str = "edge-1") -> Observer:
        obs = Observer(mqtt_settings, topics, device_id).start()
        observers.append(obs)
        return obs

    def release(version: int, artifact: bytes, device_class: str = "generic") -> None:
        server.add(artifact)
        signed = kit.release(MODEL, version, artifact, device_class=device_class)
        publish(server._transport, topics.release(MODEL, version), signed)

    try:
        yield {
            "topics": topics,
            "cloud": cloud,
            "agent": make_agent,
            "observe": observe,
            "release": release,
        }
    finally:
        for agent in agents:
            agent.stop()
        for obs in observers:
            obs.close()
        cloud.close()
        server.close()


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Liveness wait (not a timing assertion): fails only if it never happens."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def ready_agent(env: dict[str, Any], **overrides: Any) -> Agent:
    """An agent serving the slow local v1, with a measured cloud round trip."""
    env["cloud"].start()
    agent: Agent = env["agent"](**overrides)
    env["release"](1, build_classifier(heavy=4))
    assert agent.wait_for_version(MODEL, 1, timeout=30)
    for _ in range(5):  # teach the local service-time estimate
        agent.infer(MODEL, {"input": CONFIDENT})
    cloud = agent.cloud
    assert cloud is not None
    # A few probes answered: the round-trip estimate no longer rests on the first one
    # (slow while the broker, bridge and Serve warm up).
    wait_until(lambda: cloud.stats.replies >= 8)
    wait_until(lambda: cloud.breaker.state == "closed")
    return agent


def test_routes_to_the_cloud_when_the_local_queue_would_miss_the_budget(
    env: dict[str, Any],
) -> None:
    # A lenient breaker: a probe slowed by the busy CPU must not hide the cloud here.
    agent = ready_agent(env, routing={"probe_timeout_s": 2.0, "breaker_failures": 5})
    # ~7-20 ms per local run on this machine: 100 ms fits an idle device, not a queue of 20.
    budget = 100.0
    idle = agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=budget)
    assert (idle.where, idle.version) == ("edge", 1) and idle.met_budget is not None

    # A real queue: unbudgeted requests (the lean local path) pile up behind one slot.
    with ThreadPoolExecutor(24) as pool:
        backlog = [pool.submit(agent.infer, MODEL, {"input": CONFIDENT}, None) for _ in range(24)]
        wait_until(lambda: agent.admission.queue_depth >= 20)
        local_estimate = agent.admission.routing_estimate(MODEL), agent.admission.queue_depth
        cloud_state = agent.cloud.state(MODEL) if agent.cloud else None
        busy = agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=budget)
        for future in backlog:
            assert future.result().where == "edge"
    assert (busy.where, busy.version) == ("cloud", CLOUD_VERSION), (local_estimate, cloud_state)
    np.testing.assert_allclose(busy.outputs["logits"], idle.outputs["logits"], rtol=1e-5)
    assert env["cloud"].serve_calls == 1

    after = agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=budget)
    assert after.where == "edge"  # the queue drained: local again
    status = agent.status()
    assert (status.cloud_requests, status.edge_requests) == (1, 5 + 1 + 24 + 1)
    assert status.offload_ratio == pytest.approx(1 / 32)
    assert status.budgeted_requests == 3


def test_cloud_stopped_mid_load_opens_the_breaker_and_recovers(env: dict[str, Any]) -> None:
    agent = ready_agent(env)
    obs = env["observe"]()
    cloud = env["cloud"]
    budget, grace = 1000.0, 25.0  # roomy: the machine is shared, a busy CPU is no failure

    def one() -> Any:
        return agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=budget, policy="cloud-first")

    before = [one() for _ in range(3)]
    assert {r.where for r in before} == {"cloud"}
    cloud.stop()  # the cloud goes away mid-load
    with ThreadPoolExecutor(2) as pool:
        during = list(pool.map(lambda _: one(), range(12)))
    assert all(r.outputs["logits"].shape == (1, 10) for r in during)  # all answered
    assert {r.where for r in during} == {"edge"}  # served locally
    assert agent.cloud is not None
    breaker = agent.cloud.breaker
    assert breaker.snapshot().opened_count >= 1
    # Never far past budget + grace (a generous liveness bound, not a benchmark).
    assert max(r.latency_ms for r in during) < budget + grace + 2000
    assert agent.status().cloud_fallbacks < len(during)  # once open: no waiting at all
    obs.wait_for(lambda: [h for h in obs.heartbeats() if h.breaker_state != "closed"])

    cloud.start()
    wait_until(lambda: breaker.state == "closed")  # half-open probes close it
    after = one()
    assert (after.where, after.version) == ("cloud", CLOUD_VERSION)
    hb: Heartbeat = obs.wait_for(
        lambda: [
            h for h in obs.heartbeats() if h.breaker_state == "closed" and h.cloud_requests >= 4
        ]
    )[-1]
    assert hb.budgeted_requests >= 16 and 0 < hb.offload_ratio < 1


def test_cascade_asks_the_cloud_only_for_low_confidence(env: dict[str, Any]) -> None:
    agent = ready_agent(env, routing={"policy": "cascade", "cascade_threshold": 0.8})
    cloud = env["cloud"]
    sure = agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=5000)
    assert (sure.where, sure.version, cloud.serve_calls) == ("edge", 1, 0)
    unsure = agent.infer(MODEL, {"input": UNSURE}, budget_ms=5000)
    assert (unsure.where, unsure.version, cloud.serve_calls) == ("cloud", CLOUD_VERSION, 1)
    # Per request, another policy: local-only never asks.
    local = agent.infer(MODEL, {"input": UNSURE}, budget_ms=5000, policy="local-only")
    assert (local.where, cloud.serve_calls) == ("edge", 1)
    assert agent.status().cascade_escalations == 1
    with pytest.raises(InferenceInputError, match="routing policy"):
        agent.infer(MODEL, {"input": UNSURE}, policy="fastest")
    with pytest.raises(InferenceInputError, match="budget_ms"):
        agent.infer(MODEL, {"input": UNSURE}, budget_ms=-1.0)


def test_a_device_class_without_a_local_variant_is_served_by_the_cloud(
    env: dict[str, Any], tmp_path: Path
) -> None:
    env["cloud"].start()
    obs = env["observe"]("mcu-1")
    agent = env["agent"]("mcu-1", device_class="mcu")
    env["release"](1, build_classifier(heavy=4))  # only a "generic" variant
    env["release"](2, build_classifier(heavy=4))
    obs.wait_event(kind="release_rejected", reason="wrong_device_class")
    wait_until(lambda: agent.status().cloud_models == [MODEL])
    wait_until(lambda: agent.cloud is not None and agent.cloud.rtt_ms is not None)

    results = [agent.infer(MODEL, {"input": x}) for x in (CONFIDENT, UNSURE, CONFIDENT)]
    results.append(agent.infer(MODEL, {"input": UNSURE}, budget_ms=5000))
    assert {(r.where, r.version) for r in results} == {("cloud", CLOUD_VERSION)}
    assert results[0].outputs["logits"][0, 0] == pytest.approx(12.0)
    assert agent.models() == {}  # nothing installed locally
    with pytest.raises(UnknownModelError):  # not a model this device serves
        agent.infer("other", {"input": UNSURE})

    hb: Heartbeat = obs.wait_for(lambda: [h for h in obs.heartbeats() if h.cloud_requests == 4])[-1]
    assert (hb.offload_ratio, hb.edge_requests, hb.models) == (1.0, 0, {})
    assert hb.met_budget_ratio == 1.0 and hb.budgeted_requests == 1
    time.sleep(0.5)  # both releases were seen; the repeat is held back, not reported
    assert len(obs.events(reason="wrong_device_class")) == 1

    env["cloud"].stop()  # no local variant and no cloud: a clear error, at once
    wait_until(lambda: agent.cloud is not None and agent.cloud.breaker.state == "open")
    with pytest.raises(CloudUnavailableError):
        agent.infer(MODEL, {"input": UNSURE}, budget_ms=300)

    # `fogline-edge status --json` shows where requests ran.
    wait_until(lambda: _status_json(tmp_path / "mcu-1").get("cloud_requests") == 4)
    status = _status_json(tmp_path / "mcu-1")
    assert status["offload_ratio"] == 1.0 and status["edge_requests"] == 0
    assert status["met_budget_ratio"] == 1.0 and status["cloud_models"] == [MODEL]
    assert status["breaker_state"] in ("open", "half_open")
    text = _status_text(tmp_path / "mcu-1")
    assert "edge 0, cloud 4 (offload 100.0%)" in text and "breaker" in text


def _status_json(data_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "fogline.edge.cli", "status", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        return {}
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _status_text(data_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fogline.edge.cli", "status", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout


def test_threads_are_left_behind_by_no_agent(env: dict[str, Any]) -> None:
    before = set(threading.enumerate())
    agent = ready_agent(env)
    agent.infer(MODEL, {"input": CONFIDENT}, budget_ms=1000, policy="cloud-only")
    agent.stop()
    env["cloud"].stop()
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert all(not t.name.startswith("fogline-cloud-probe") for t in left), left
