"""Rollout benchmark: a ~1 MB signed model release to N simulated agents, in one process
and spread over K worker processes.

Measured: the time from publishing the release (and the fleet-wide desired state) until
every agent serves the new version (``Agent.wait_for_version``). Agents fetch the
artifact in chunks from the cloud's real ``ArtifactService`` over the same Mosquitto.

Floor, in the same run and on the same broker: one plain paho-mqtt publisher sends the
same bytes once to N plain paho-mqtt subscribers; time from publish until all N have
them. Each row measures both ``--repeat`` times (default 3), alternating, and the table
gives the medians and their ratio; the target is at most 3x at N = 200. Also printed:
the artifact service's publishes (multicast batches vs. unicast replies), which request
coalescing keeps far below 2 x N.

With ``--processes K`` (default 4) every size also runs with the N agents spread over K
worker processes (``bench/_rollout_worker.py``, ~N/K agents each, one ``SimulatedFleet``
per worker) and the floor with the same split (N subscribers over K processes); the
artifact service and the publisher stay in this process. ``--processes 1`` runs only the
single-process rows.

``--pin-cpus`` runs each process that hosts agents or floor subscribers on one CPU (one
process: this one, for the floor and Fogline alike; K processes: round-robin over the
CPUs), to see what cross-CPU wake-ups cost (docs/benchmarks.md).

``--thread-switches`` prints, for each one-process rollout, the CPU time and context
switches of this process's threads by kind (delivery, network, probes...): with hundreds
of threads under one GIL, many switches are GIL hand-offs and timeouts
(docs/benchmarks.md).

``--agents-per-thread T`` (default 10; several values: a row each) lets one MQTT network
thread serve T simulated agents' connections (``SimulatedFleet(agents_per_network_thread=T)``:
each agent still has its own connection, session and packets; only the thread is
shared, which a device, running one agent, does not need). ``1``: a thread per agent.

    .venv/bin/python bench/rollout.py                            # N = 50, 100, 200
    .venv/bin/python bench/rollout.py --sizes 50 100 200 --processes 4
    .venv/bin/python bench/rollout.py --sizes 200 --processes 1 4  # the same two splits
    .venv/bin/python bench/rollout.py --sizes 20 --processes 1 --repeat 1  # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as paho
from _host import python_speed_ms
from _threads import new_threads_cpu, snapshot, switch_table
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

from fogline.cloud import ArtifactService, ArtifactStore
from fogline.firmware_sim import SimulatedFleet
from fogline.protocol import (
    MAX_CHUNK_SIZE,
    ConfigError,
    DesiredModel,
    DesiredState,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    ReleaseManifest,
    ReleaseVariant,
    SigningKey,
    TensorSpec,
    Topics,
    encode,
    sign_desired,
    sign_release,
)

MODEL = "bench-model"
CHUNK = MAX_CHUNK_SIZE  # 1 MiB: two requests for the ~1.2 MB artifact
WORKER = Path(__file__).with_name("_rollout_worker.py")


def build_model(hidden: int = 4096, seed: int = 0) -> bytes:
    """An MLP on 1x1x8x8 digits whose 64 x ``hidden`` weights make it ~1 MB."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, hidden)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 10)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["logits"]),
        ],
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def split(n: int, k: int) -> list[int]:
    """N over at most K processes, as evenly as possible."""
    return [n // k + (1 if i < n % k else 0) for i in range(min(n, k))]


def _expect(outputs: list[queue.Queue[str]], word: str, timeout: float) -> list[str]:
    """The next line of every worker, which must be ``word ...``; their arguments. (One
    queue per worker: a fast worker's later lines, or its exit, wait their turn.)"""
    deadline = time.monotonic() + timeout
    got = []
    for index, output in enumerate(outputs):
        try:
            line = output.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"worker {index} did not say {word!r} in time") from None
        head, _, rest = line.partition(" ")
        if head != word:
            raise RuntimeError(f"worker {index}: {line or 'exited'}")
        got.append(rest)
    return got


@contextmanager
def workers(
    mode: str, configs: list[dict[str, Any]], pin: bool = False
) -> Iterator[Callable[[], tuple[float, float]]]:
    """Start one ``_rollout_worker.py`` per config and wait until all are ready; yields a
    function waiting for every worker's ``done`` (returns the latest timestamp and the
    workers' CPU seconds since ready). With ``pin``, worker i runs on CPU i modulo the
    CPUs this process may use. Every worker is stopped on the way out, also on failure."""
    procs: list[subprocess.Popen[str]] = []
    outputs: list[queue.Queue[str]] = []

    def pump(proc: subprocess.Popen[str], output: queue.Queue[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.put(line.strip())
        output.put("")  # end of output: the worker is gone

    def wait_done() -> tuple[float, float]:
        done = [line.split() for line in _expect(outputs, "done", 900)]
        return max(float(t) for t, _ in done), sum(float(cpu) for _, cpu in done)

    try:
        cpus = sorted(os.sched_getaffinity(0)) if pin else []
        for index, cfg in enumerate(configs):
            cpu = {cpus[index % len(cpus)]} if pin else set()
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), mode, json.dumps(cfg)],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpu)) if pin else None,  # noqa: B023
            )
            procs.append(proc)
            outputs.append(queue.Queue())
            threading.Thread(target=pump, args=(proc, outputs[-1]), daemon=True).start()
        _expect(outputs, "ready", 300)
        yield wait_done
        for proc in procs:  # let them stop their agents before the next measurement
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def local_fleet(
    n: int,
    settings: MqttSettings,
    key: SigningKey,
    topics: Topics,
    root: Path,
    agents_per_thread: int = 1,
) -> Iterator[Callable[[], tuple[float, float]]]:
    """N agents in this process; yields a function waiting until all serve v1."""
    fleet = SimulatedFleet(
        devices=n,
        profile_mix={"jetson-like": 1.0},
        broker_url=settings.url,
        trusted_keys=[key.public_key.to_text()],
        data_root=root,
        models=[MODEL],
        topic_prefix=topics.prefix,
        rate_per_device=0.0,
        heartbeat_interval_s=30.0,
        link_emulation=False,  # measure the system, not a simulated WAN
        flaps=False,
        control=False,
        agents_per_network_thread=agents_per_thread,
    )

    def wait_done() -> tuple[float, float]:
        late = fleet.wait_for_version(MODEL, 1, timeout=600)
        done = time.monotonic()
        if late:
            raise RuntimeError(f"{len(late)} agents never served v1: {late[:5]}")
        return done, 0.0  # the agents' CPU is counted in this process's

    try:
        fleet.start(traffic=False)
        if fleet.wait_connected(120):
            raise RuntimeError("agents did not connect")
        yield wait_done
    finally:
        fleet.stop()


def fogline_rollout(
    n: int,
    settings: MqttSettings,
    artifact: bytes,
    store: ArtifactStore,
    root: Path,
    processes: int = 1,
    agents_per_thread: int = 1,
    remove_data: bool = False,
    thread_switches: bool = False,
    pin: bool = False,
) -> tuple[float, float, dict[str, int]]:
    """Seconds from publish until all N serve v1, and the CPU seconds that took (this
    process, with the artifact service, plus the workers'; not the broker's)."""
    topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
    key = SigningKey.generate()
    digest = store.put_bytes(artifact)
    cloud = MqttTransport(settings, client_id=f"bench-cloud-{uuid.uuid4().hex[:6]}")
    service = ArtifactService(cloud, store, topics=topics)
    cloud.connect()
    service.start()
    data_root = root / f"fleet-{n}-{processes}p-{agents_per_thread}t-{topics.prefix[-8:]}"
    if processes == 1:
        agents = local_fleet(n, settings, key, topics, data_root, agents_per_thread)
    else:
        configs = [
            {
                "devices": share,
                "broker_url": settings.url,
                "trusted_key": key.public_key.to_text(),
                "data_root": str(data_root / f"w{index}"),
                "model": MODEL,
                "version": 1,
                "topic_prefix": topics.prefix,
                "device_prefix": f"w{index}",
                "agents_per_thread": agents_per_thread,
            }
            for index, share in enumerate(split(n, processes))
        ]
        agents = workers("fleet", configs, pin)
    try:
        with agents as wait_done:
            now = time.time()
            spec_in = [TensorSpec(name="input", dtype="float32", shape=[-1, 1, 8, 8])]
            spec_out = [TensorSpec(name="logits", dtype="float32", shape=[-1, 10])]
            manifest = ReleaseManifest(
                model=MODEL,
                version=1,
                created_at=now,
                expires_at=now + 3600,
                key_id="x",
                variants=[
                    ReleaseVariant(
                        device_class="cpu-4t",
                        quantization="fp32",
                        sha256=digest,
                        size=len(artifact),
                        chunk_size=CHUNK,
                        inputs=spec_in,
                        outputs=spec_out,
                    )
                ],
            )
            desired = DesiredState(
                scope="fleet",
                sequence=1,
                issued_at=now,
                key_id="x",
                models={MODEL: DesiredModel(version=1)},
            )
            switches = snapshot() if thread_switches and processes == 1 else None
            # CLOCK_MONOTONIC is system-wide: comparable with the workers' timestamps.
            cpu = time.process_time()
            started = time.monotonic()
            cloud.publish(
                topics.release(MODEL, 1),
                encode(sign_release(manifest, key)),
                qos=1,
                retain=True,
                wait=True,
            )
            cloud.publish(
                topics.fleet_desired(),
                encode(sign_desired(desired, key)),
                qos=1,
                retain=True,
                wait=True,
            )
            done, workers_cpu = wait_done()
            cpu = time.process_time() - cpu + workers_cpu
            if switches is not None:
                after = snapshot()
                print("CPU and context switches during the rollout, by kind of thread:")
                print("\n".join(switch_table(switches, after)))
                started_inside = new_threads_cpu(switches, after, cpu - workers_cpu)
                print(
                    f"  threads started during the rollout: CPU {started_inside:.2f} s", flush=True
                )
        return done - started, cpu, service.stats()
    finally:
        service.close()
        cloud.close()
        # Kept to the end of the run by default: on ext4 without a journal (this machine's
        # disk) every file creation skips the inodes freed in the last 60-360 s, one
        # buffer lookup each, so removing 200 agents' files here taxed the next
        # measurement's creations (~20% of its CPU in the kernel's inode allocator).
        if remove_data:
            shutil.rmtree(data_root, ignore_errors=True)


def paho_floor_split(
    n: int, settings: MqttSettings, payload: bytes, processes: int, pin: bool = False
) -> float:
    """The floor with the same process split: N subscribers over K worker processes."""
    topic = f"bench-floor/{uuid.uuid4().hex[:8]}"
    configs = [
        {
            "subscribers": share,
            "size": len(payload),
            "topic": topic,
            "host": settings.host,
            "port": settings.port,
        }
        for share in split(n, processes)
    ]
    with workers("floor", configs, pin) as wait_done:
        pub = paho.Client(CallbackAPIVersion.VERSION2)
        pub.connect(settings.host, settings.port)
        pub.loop_start()
        try:
            started = time.monotonic()
            pub.publish(topic, payload, qos=1)
            return wait_done()[0] - started
        finally:
            pub.disconnect()
            pub.loop_stop()


def paho_floor(n: int, settings: MqttSettings, payload: bytes) -> float:
    topic = f"bench-floor/{uuid.uuid4().hex[:8]}"
    received = threading.Semaphore(0)
    subscribed = threading.Semaphore(0)
    clients: list[paho.Client] = []

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if len(msg.payload) == len(payload):
            received.release()

    def on_subscribe(*_a: object) -> None:
        subscribed.release()

    def on_connect(client: paho.Client, *_a: object) -> None:
        client.subscribe(topic, qos=1)

    try:
        for _ in range(n):
            c = paho.Client(CallbackAPIVersion.VERSION2)
            c.on_message = on_message
            c.on_connect = on_connect
            c.on_subscribe = on_subscribe
            c.connect(settings.host, settings.port)
            c.loop_start()
            clients.append(c)
        for _ in range(n):
            if not subscribed.acquire(timeout=60):
                raise RuntimeError("floor subscribers did not subscribe")
        pub = paho.Client(CallbackAPIVersion.VERSION2)
        pub.connect(settings.host, settings.port)
        pub.loop_start()
        clients.append(pub)
        started = time.perf_counter()
        pub.publish(topic, payload, qos=1)
        for _ in range(n):
            if not received.acquire(timeout=300):
                raise RuntimeError("floor subscribers did not all receive")
        return time.perf_counter() - started
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[4],
        help="K: also run with the agents (and the floor's subscribers) over K processes; "
        "several values: exactly those splits (e.g. 1 4)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measurements of the floor and of Fogline per row, alternating; the table "
        "gives their medians (one sample of the floor alone moves by half)",
    )
    parser.add_argument(
        "--agents-per-thread",
        type=int,
        nargs="+",
        default=[10],
        help="simulated agents per MQTT network thread (SimulatedFleet's "
        "agents_per_network_thread; 1: a thread each, as on a device); several values: "
        "a row each",
    )
    parser.add_argument(
        "--remove-between",
        action="store_true",
        help="remove each measurement's agent data right after it (the default keeps it "
        "until the end of the run; see fogline_rollout)",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="run each process that hosts agents or floor subscribers on one CPU (the "
        "same for Fogline and the floor; see the module docstring)",
    )
    parser.add_argument(
        "--thread-switches",
        action="store_true",
        help="print each one-process rollout's CPU time and context switches by kind of "
        "thread (bench/_threads.py; Linux)",
    )
    args = parser.parse_args()
    if min(args.agents_per_thread) < 1:
        parser.error("--agents-per-thread must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if min(args.processes) < 1:
        parser.error("--processes must be at least 1")
    if len(args.processes) == 1:
        splits = sorted({1, args.processes[0]})
    else:
        splits = list(dict.fromkeys(args.processes))
    logging.basicConfig(level=logging.ERROR)
    artifact = build_model()
    onnx.checker.check_model(onnx.load_from_string(artifact))
    print(f"release artifact: {len(artifact) / 1e6:.2f} MB, chunks of {CHUNK // 1024} KiB")
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"host speed at the start: sum(range(10**6)) in {python_speed_ms():.1f} ms")
    rows: list[tuple[int, int, int, list[tuple[float, float, float, str]]]] = []
    all_cpus = sorted(os.sched_getaffinity(0)) if args.pin_cpus else []
    with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
        root = Path(tmp)
        broker = MosquittoBroker(workdir=root / "broker")
        (root / "broker").mkdir()
        broker.start()
        try:
            settings = MqttSettings(url=broker.url)
            store = ArtifactStore(root / "artifacts")
            for n in args.sizes:
                for k, t in [(k, t) for k in splits for t in args.agents_per_thread]:
                    runs: list[tuple[float, float, float, str]] = []
                    if args.pin_cpus:
                        # One process: this thread's CPU, inherited by every thread the
                        # measurement starts (floor subscribers, agents, artifact service).
                        os.sched_setaffinity(0, {all_cpus[-1]} if k == 1 else all_cpus)
                    for attempt in range(1, args.repeat + 1):
                        if k == 1:
                            floor = paho_floor(n, settings, artifact)
                        else:
                            floor = paho_floor_split(n, settings, artifact, k, pin=args.pin_cpus)
                        try:
                            fogline, cpu, stats = fogline_rollout(
                                n,
                                settings,
                                artifact,
                                store,
                                root,
                                k,
                                t,
                                remove_data=args.remove_between,
                                thread_switches=args.thread_switches,
                                pin=args.pin_cpus,
                            )
                        except ConfigError as exc:  # e.g. a hard RLIMIT_NOFILE too low for N
                            print(f"N={n:4d} K={k} T={t}  not run: {exc}", flush=True)
                            break
                        service = f"{stats['chunks_multicast']} + {stats['chunks_served']}"
                        runs.append((fogline, floor, cpu, service))
                        print(
                            f"N={n:4d} K={k} T={t:2d} run {attempt}  fogline {fogline:7.2f}s  "
                            f"paho floor {floor:6.2f}s  "
                            f"ratio {fogline / floor:6.1f}x  cpu {cpu:6.2f}s  service: {service} "
                            f"(multicast + unicast) chunk publishes, "
                            f"{stats['requests_coalesced']} requests coalesced",
                            flush=True,
                        )
                    if runs:
                        rows.append((n, k, t, runs))
        finally:
            broker.close()
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"host speed at the end: sum(range(10**6)) in {python_speed_ms():.1f} ms")
    print()
    print(
        "| N | processes | agents per network thread | runs "
        "| Fogline publish -> all serve, median (range) s "
        "| paho fan-out floor, median (range) s | ratio of the medians "
        "| Fogline CPU, median s | service chunk publishes (multicast + unicast) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k, t, runs in rows:
        rollouts = [r[0] for r in runs]
        floors = [r[1] for r in runs]
        print(
            f"| {n} | {k} | {t} | {len(runs)} "
            f"| {statistics.median(rollouts):.2f} ({min(rollouts):.2f}-{max(rollouts):.2f}) "
            f"| {statistics.median(floors):.2f} ({min(floors):.2f}-{max(floors):.2f}) "
            f"| {statistics.median(rollouts) / statistics.median(floors):.1f}x "
            f"| {statistics.median(r[2] for r in runs):.2f} "
            f"| {', '.join(sorted(set(r[3] for r in runs)))} |"
        )


if __name__ == "__main__":
    main()
