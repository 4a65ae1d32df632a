"""Rollout benchmark: a ~1 MB signed model release to N simulated agents in one process.

Measured: the time from publishing the release (and the fleet-wide desired state) until
every agent serves the new version (``Agent.wait_for_version``). Agents fetch the
artifact in chunks from the cloud's real ``ArtifactService`` over the same Mosquitto.

Floor, in the same run and on the same broker: one plain paho-mqtt publisher sends the
same bytes once to N plain paho-mqtt subscribers; time from publish until all N have
them. The ratio is Fogline / floor; the target is at most 3x at N = 200. Also printed:
the artifact service's publishes (multicast batches vs. unicast replies), which request
coalescing keeps far below 2 x N.

    .venv/bin/python bench/rollout.py              # N = 50, 100, 200
    .venv/bin/python bench/rollout.py --sizes 20   # quick look
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import paho.mqtt.client as paho
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


def fogline_rollout(
    n: int, settings: MqttSettings, artifact: bytes, store: ArtifactStore, root: Path
) -> tuple[float, dict[str, int]]:
    topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
    key = SigningKey.generate()
    digest = store.put_bytes(artifact)
    cloud = MqttTransport(settings, client_id=f"bench-cloud-{uuid.uuid4().hex[:6]}")
    service = ArtifactService(cloud, store, topics=topics)
    cloud.connect()
    service.start()
    fleet = SimulatedFleet(
        devices=n,
        profile_mix={"jetson-like": 1.0},
        broker_url=settings.url,
        trusted_keys=[key.public_key.to_text()],
        data_root=root / f"fleet-{n}",
        models=[MODEL],
        topic_prefix=topics.prefix,
        rate_per_device=0.0,
        heartbeat_interval_s=30.0,
        link_emulation=False,  # measure the system, not a simulated WAN
        flaps=False,
        control=False,
    )
    try:
        fleet.start(traffic=False)
        if fleet.wait_connected(120):
            raise RuntimeError("agents did not connect")
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
        started = time.perf_counter()
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
        late = fleet.wait_for_version(MODEL, 1, timeout=600)
        elapsed = time.perf_counter() - started
        if late:
            raise RuntimeError(f"{len(late)} agents never served v1: {late[:5]}")
        return elapsed, service.stats()
    finally:
        fleet.stop()
        service.close()
        cloud.close()


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    artifact = build_model()
    onnx.checker.check_model(onnx.load_from_string(artifact))
    print(f"release artifact: {len(artifact) / 1e6:.2f} MB, chunks of {CHUNK // 1024} KiB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
        root = Path(tmp)
        broker = MosquittoBroker(workdir=root / "broker")
        (root / "broker").mkdir()
        broker.start()
        try:
            settings = MqttSettings(url=broker.url)
            store = ArtifactStore(root / "artifacts")
            for n in args.sizes:
                floor = paho_floor(n, settings, artifact)
                try:
                    fogline, stats = fogline_rollout(n, settings, artifact, store, root)
                except ConfigError as exc:  # e.g. a hard RLIMIT_NOFILE too low for N agents
                    print(f"N={n:4d}  not run: {exc}", flush=True)
                    continue
                rows.append((n, fogline, floor))
                print(
                    f"N={n:4d}  fogline {fogline:7.2f}s  paho floor {floor:6.2f}s  "
                    f"ratio {fogline / floor:6.1f}x  service: "
                    f"{stats['chunks_multicast']} multicast + {stats['chunks_served']} unicast "
                    f"chunk publishes, {stats['requests_coalesced']} requests coalesced",
                    flush=True,
                )
        finally:
            broker.close()
    print()
    print("| N | Fogline publish -> all serve (s) | paho fan-out floor (s) | ratio |")
    print("|---|---|---|---|")
    for n, fogline, floor in rows:
        print(f"| {n} | {fogline:.2f} | {floor:.2f} | {fogline / floor:.1f}x |")


if __name__ == "__main__":
    main()
