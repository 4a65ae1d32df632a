"""Hybrid routing under open-loop load: local-only and cloud-only baselines against
local-first, in the same run.

Poisson arrivals at 0.5x, 1x, 2x and 4x the measured local capacity; every request has a
50 ms budget. Every request goes through the real ``Agent.infer`` (one slot, a queue of
64, the model installed in its store): the agent's router decides, its local path is
admission control in front of ONNX Runtime, its cloud path is the real one:
``CloudClient`` -> Mosquitto (a generated config with TCP_NODELAY, never the system
broker) -> ``InferenceBridge`` -> Ray Serve (local Ray) -> ONNX Runtime, with about
10 ms of one-way delay injected in each direction between edge and cloud. The cloud side
(Ray, Serve and the bridge) runs in its own process, ``bench/_routing_cloud.py``, as in a
deployment; the edge agent and the load generator run in this one.

Latency is measured from the scheduled arrival time, so queueing shows. A request the
local queue refuses counts as a miss. Reported per load and policy: the share of
requests that met the budget, p50/p99 latency and the offload ratio, and the ratio of
local-first's met-budget share to the better baseline's.

    .venv/bin/python bench/routing.py [--duration 4] [--delay-ms 10] [--json]

The edge is a simulated device of the firmware simulator's ``rpi4`` profile (one
inference thread, about 3x slower than this host): each local run is followed by a sleep
of twice its duration (:class:`fogline.firmware_sim.SlowSessionCache`), so the device's
extra slowness costs none of the host's cores. Without it (``--speed-factor 1``) edge
and cloud compete for the same two cores, and at 2x local capacity the inference alone
needs both of them; a real edge device does not share the cloud's CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _host import python_speed_ms
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from fogline.edge import (
    Agent,
    CloudClient,
    InstalledModel,
    ModelStore,
    SessionCache,
    load_config,
)
from fogline.firmware_sim import SlowSessionCache, load_profiles
from fogline.protocol import (
    FoglineError,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    TensorSpec,
    Topics,
)

log = logging.getLogger("bench.routing")

BUDGET_MS = 50.0
LOADS = (0.5, 1.0, 2.0, 4.0)
POLICIES = ("local-only", "cloud-only", "local-first")
MODEL = "cnn"


def build_cnn(channels: int = 64, layers: int = 6) -> bytes:
    """A small CNN (3x3 convolutions on 8x32x32, global pooling, softmax): a few
    milliseconds per request on one thread, with small weights and inputs."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 8
    for i in range(layers):
        w = (rng.normal(size=(channels, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, cin = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    nodes.append(helper.make_node("Softmax", ["flat"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", channels])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    serialized: bytes = model.SerializeToString()
    return serialized


class DelayedTransport(MqttTransport):
    """Publishes after a fixed delay: the injected one-way network latency."""

    def __init__(self, settings: MqttSettings, delay_s: float) -> None:
        super().__init__(settings)
        self.delay_s = delay_s
        self._heap: list[tuple[float, int, str, bytes, int]] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, **kw: Any) -> None:
        with self._cv:
            self._seq += 1
            due = time.monotonic() + self.delay_s
            heapq.heappush(self._heap, (due, self._seq, topic, payload, qos))
            self._cv.notify()

    def _pump(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stop:
                    return
                _, _, topic, payload, qos = heapq.heappop(self._heap)
            with contextlib.suppress(FoglineError):
                super().publish(topic, payload, qos=qos)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()
        super().close(timeout)


@dataclass
class Row:
    load: float
    policy: str
    rate_rps: float
    requests: int
    met_budget: float
    p50_ms: float
    p99_ms: float
    offload_ratio: float
    refused: int
    late_edge: int  # answered after the budget, on the edge
    late_cloud: int  # answered after the budget, from the cloud
    breaker_opens: int = 0  # times the agent's cloud breaker opened during the run


def install(data_dir: Path, model: bytes) -> None:
    """Put the model in the agent's store as if a release had installed it."""
    store = ModelStore(data_dir)
    digest = hashlib.sha256(model).hexdigest()
    incoming = data_dir / "incoming.onnx"
    incoming.write_bytes(model)
    placed = store.place(MODEL, 1, digest, incoming, move=True)
    specs_in = [TensorSpec(name="x", dtype="float32", shape=[-1, 8, 32, 32])]
    specs_out = [TensorSpec(name="probs", dtype="float32", shape=[-1, 64])]
    store.commit(
        InstalledModel(
            model=MODEL,
            version=1,
            sha256=digest,
            file=placed.name,
            inputs=[t.model_dump() for t in specs_in],
            outputs=[t.model_dump() for t in specs_out],
        )
    )


def run_load(
    policy: str, rate: float, duration: float, agent: Agent, x: np.ndarray, load: float
) -> Row:
    rng = np.random.default_rng(int(rate * 1000) + len(policy))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    latencies: list[float] = []
    targets: list[str] = []
    refused = 0
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def one(t0: float) -> None:
        nonlocal refused
        try:
            res = agent.infer(MODEL, {"x": x}, budget_ms=BUDGET_MS, policy=policy)
            target: str = res.where
        except FoglineError as exc:
            target = "refused"
            with lock:
                errors[exc.code] = errors.get(exc.code, 0) + 1
        ms = (time.monotonic() - t0) * 1000.0
        with lock:
            latencies.append(ms if target != "refused" else float("inf"))
            targets.append(target)
            refused += target == "refused"

    start = time.monotonic() + 0.05
    with ThreadPoolExecutor(max_workers=128) as pool:
        for offset in arrivals:
            t0 = start + offset
            delay = t0 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, t0)
    if errors:
        log.warning("%s at %.1fx: errors %s", policy, load, errors)
    lat = np.array(latencies)
    answered = list(zip(targets, latencies, strict=True))
    finite = lat[np.isfinite(lat)]
    return Row(
        load=load,
        policy=policy,
        rate_rps=rate,
        requests=len(lat),
        met_budget=float(np.mean(lat <= BUDGET_MS)) if lat.size else 0.0,
        p50_ms=float(np.percentile(finite, 50)) if finite.size else float("nan"),
        # "higher": a refused request (inf) in the top 1% makes p99 inf, not nan.
        p99_ms=float(np.percentile(lat, 99, method="higher")) if lat.size else float("nan"),
        offload_ratio=targets.count("cloud") / max(1, len(targets)),
        refused=refused,
        late_edge=int(sum(t == "edge" and ms > BUDGET_MS for t, ms in answered)),
        late_cloud=int(sum(t == "cloud" and ms > BUDGET_MS for t, ms in answered)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load and policy")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way edge-cloud delay")
    parser.add_argument(
        "--profile", default="rpi4", help="firmware-sim hardware profile of the edge device"
    )
    parser.add_argument(
        "--speed-factor",
        type=float,
        default=None,
        help="override the profile's speed factor (1 = host speed, sharing its cores)",
    )
    parser.add_argument(
        "--on-no-path",
        choices=("run-late", "refuse"),
        default="refuse",
        help="what the agent does when no path meets the budget (the agent's setting)",
    )
    parser.add_argument(
        "--serve-calls",
        choices=("by-value", "by-reference"),
        default="by-value",
        help="how the bridge calls Ray Serve (ServingSettings.by_value_calls)",
    )
    parser.add_argument("--loads", type=float, nargs="+", default=list(LOADS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=args.json, width=150)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    profile = load_profiles()[args.profile]
    host_ms = python_speed_ms()
    console.print(f"host speed: sum(range(10**6)) in {host_ms:.1f} ms")
    speed = args.speed_factor if args.speed_factor is not None else profile.speed_factor
    model = build_cnn()
    onnx.checker.check_model(onnx.load_from_string(model))
    x = np.random.default_rng(1).normal(size=(1, 8, 32, 32)).astype(np.float32)

    broker = MosquittoBroker()  # generated config: set_tcp_nodelay true
    broker.start()
    settings = MqttSettings(url=broker.url)
    topics = Topics()
    transports: list[MqttTransport] = []
    rows: list[Row] = []
    agent: Agent | None = None
    cloud_proc: subprocess.Popen[str] | None = None
    bridge_stats: dict[str, int] = {}
    tmp = tempfile.TemporaryDirectory(prefix="fogline-bench-routing-")
    try:
        model_file = Path(tmp.name) / "cloud-model.onnx"
        model_file.write_bytes(model)
        cloud_proc = start_cloud(
            broker.url, topics.prefix, model_file, args.delay_ms, args.serve_calls == "by-value"
        )
        edge_tx = DelayedTransport(settings, args.delay_ms / 1000.0)
        transports.append(edge_tx)
        edge_tx.connect()

        data_dir = Path(tmp.name) / "edge"
        data_dir.mkdir()
        install(data_dir, model)
        config = load_config(
            env={},
            device_id="bench-edge",
            data_dir=str(data_dir),
            models=[MODEL],
            http={"enabled": False},
            heartbeat_interval_s=5.0,
            topic_prefix=topics.prefix,
            # One inference at a time: the profile's device has one inference thread.
            capacity={"max_in_flight": 1, "max_queue": 64, "intra_op_threads": profile.threads},
            routing={
                "grace_ms": 10.0,
                "probe_interval_s": 0.2,
                "breaker_failures": 20,
                "on_no_path": args.on_no_path,
            },
        )
        agent = Agent(
            config, transport=edge_tx, session_cache=SlowSessionCache(SessionCache(), speed)
        )
        agent.start()
        for _ in range(20):
            agent.infer(MODEL, {"x": x})
        service = float(np.median([agent.infer(MODEL, {"x": x}).latency_ms for _ in range(100)]))
        capacity = 1000.0 / service * config.capacity.max_in_flight
        console.print(
            f"edge: {args.profile} profile, speed factor {speed:g}: local service "
            f"{service:.2f} ms -> capacity {capacity:.0f} req/s"
        )
        for _ in range(20):
            agent.infer(MODEL, {"x": x}, budget_ms=5000, policy="cloud-only")
        cloud = agent.cloud
        assert cloud is not None
        console.print(
            f"cloud round trip {cloud.rtt_ms or 0:.1f} ms + service "
            f"{cloud.service_ms(MODEL) or 0:.1f} ms (one-way delay {args.delay_ms:.0f} ms, "
            f"Serve calls {args.serve_calls})"
        )
        idle_calls = [cloud.infer(MODEL, {"x": x}, timeout_s=2.0).rtt_ms for _ in range(10)]
        idle_ms = (cloud.rtt_ms or 0.0, float(np.median(idle_calls)))
        for load in args.loads:
            for policy in args.policies:
                opened = cloud.breaker.snapshot().opened_count
                row = run_load(policy, capacity * load, args.duration, agent, x, load)
                row = replace(row, breaker_opens=cloud.breaker.snapshot().opened_count - opened)
                rows.append(row)
                console.print(f"{load}x {policy}: met {row.met_budget:.3f}")
                time.sleep(0.5)  # drain
                # Each run starts from a closed breaker and a drained cloud: one run's
                # outage or backlog must not decide the next run's figures.
                wait_for_drained_cloud(cloud, idle_ms, x)
                cloud.breaker.reset()  # after the drain: its own probes may have tripped it
        status = agent.status()
        console.print(
            f"agent: edge {status.edge_requests}, cloud {status.cloud_requests}, "
            f"met {status.met_budget_ratio:.1%}, breaker {status.breaker_state}"
        )
        agent.stop()
        agent = None
        bridge_stats = stop_cloud(cloud_proc)
        cloud_proc = None
        bs = bridge_stats
        console.print(
            f"bridge: received {bs.get('received')}, forwarded {bs.get('forwarded')} in "
            f"{bs.get('serve_calls')} Serve calls, answered {bs.get('answered')}, errors "
            f"{bs.get('errors')}, expired {bs.get('expired')}, over capacity "
            f"{bs.get('over_capacity')}"
        )
    finally:
        if agent is not None:
            agent.stop()
        for t in transports:
            t.close()
        if cloud_proc is not None:
            stop_cloud(cloud_proc)
        broker.close()
        tmp.cleanup()
    report(rows, service, capacity, host_ms, args, console)


def wait_for_drained_cloud(
    cloud: CloudClient, idle_ms: tuple[float, float], x: np.ndarray, limit_s: float = 10.0
) -> None:
    """Wait until the cloud answers a probe and a real request about as fast as it did
    idle (``idle_ms``: probe round trip, request round trip): a cloud-only run above its
    capacity leaves a backlog in the bridge and in Serve for seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if cloud.probe(MODEL) <= 1.5 * idle_ms[0] + 2.0:
                answer = cloud.infer(MODEL, {"x": x}, timeout_s=1.0)
                if answer.rtt_ms <= 1.5 * idle_ms[1] + 2.0:
                    return
        except FoglineError:
            pass
        time.sleep(0.2)
    log.warning("the cloud did not drain within %.0f s", limit_s)


def start_cloud(
    broker_url: str, prefix: str, model_file: Path, delay_ms: float, by_value_calls: bool
) -> subprocess.Popen[str]:
    """Start the cloud process and wait for its bridge to be subscribed."""
    cfg = {
        "broker_url": broker_url,
        "prefix": prefix,
        "model_file": str(model_file),
        "model": MODEL,
        "delay_ms": delay_ms,
        "by_value_calls": by_value_calls,
    }
    worker = Path(__file__).with_name("_routing_cloud.py")
    proc = subprocess.Popen(
        [sys.executable, str(worker), json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # Ray and Serve start: tens of seconds at most
        if line.strip() == "ready":
            return proc
    stop_cloud(proc)
    raise RuntimeError(f"the cloud process exited before it was ready ({proc.returncode})")


def stop_cloud(proc: subprocess.Popen[str]) -> dict[str, int]:
    """Ask the cloud process to stop; returns its bridge counters. Kills it if it hangs."""
    stats: dict[str, int] = {}
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("stop\n")
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith("stats "):
                stats = json.loads(line[len("stats ") :])
        proc.wait(timeout=60)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    return stats


def report(
    rows: list[Row],
    service: float,
    capacity: float,
    host_ms: float,
    args: Any,
    console: Console,
) -> None:
    ratios = {}
    for load in args.loads:
        by = {r.policy: r for r in rows if r.load == load}
        if len(by) < len(POLICIES):
            continue
        best = max(by["local-only"].met_budget, by["cloud-only"].met_budget)
        ratios[str(load)] = by["local-first"].met_budget / best if best else float("inf")
    if args.json:
        print(
            json.dumps(
                {
                    "budget_ms": BUDGET_MS,
                    "delay_ms": args.delay_ms,
                    "on_no_path": args.on_no_path,
                    "local_service_ms": service,
                    "local_capacity_rps": capacity,
                    "host_speed_ms": host_ms,
                    "rows": [asdict(r) for r in rows],
                    "local_first_vs_best_baseline": ratios,
                }
            )
        )
        return
    title = (
        f"Routing, budget {BUDGET_MS:.0f} ms, one-way delay {args.delay_ms:.0f} ms, "
        f"no path: {args.on_no_path}"
    )
    table = Table(title=title)
    columns = (
        "load",
        "policy",
        "req/s",
        "n",
        "met",
        "p50 ms",
        "p99 ms",
        "offload",
        "refused",
        "late edge",
        "late cloud",
        "breaker opened",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r.load}x",
            r.policy,
            f"{r.rate_rps:.0f}",
            str(r.requests),
            f"{r.met_budget:.1%}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.offload_ratio:.1%}",
            str(r.refused),
            str(r.late_edge),
            str(r.late_cloud),
            str(r.breaker_opens),
        )
    console.print(table)
    for load, ratio in ratios.items():
        console.print(f"{load}x: local-first / best baseline met-budget ratio = {ratio:.2f}")


if __name__ == "__main__":
    main()
