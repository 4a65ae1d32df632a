"""Heartbeats per second the fleet monitor sustains, against a plain paho-mqtt subscriber.

Both runs use the same private Mosquitto, the same pre-encoded heartbeats and the same
publisher processes, one after the other in this one run:

- **baseline**: a plain paho-mqtt subscriber that only counts messages;
- **fogline**: a :class:`FleetMonitor` that decodes, validates and checks every message
  and writes it to a SQLite registry. It is timed until the *store* holds every
  heartbeat (committed), not merely until they arrived.

Rate = heartbeats / (last one done - publishers released). The broker is configured
with unlimited queues so nothing is dropped and both runs count every message.

    .venv/bin/python bench/ingest.py [--messages 20000] [--publishers 2] [--devices 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fogline.cloud.fleet import FleetMonitor, SqliteFleetStore
from fogline.protocol import Heartbeat, MosquittoBroker, MqttSettings, Topics, encode

QOS = 1


def _heartbeats(topics: Topics, messages: int, devices: int) -> list[tuple[str, bytes]]:
    out = []
    now = time.time()
    for i in range(messages):
        dev, seq = f"bench-{i % devices:05d}", i // devices + 1
        hb = Heartbeat(
            device_id=dev,
            device_class="rpi4",
            seq=seq,
            at=now + seq,
            uptime_s=float(seq),
            interval_s=10.0,
            models={"digits": 3},
            requests=seq * 10,
            edge_requests=seq * 8,
            cloud_requests=seq * 2,
            latency_p50_ms=4.2,
            latency_p99_ms=17.0,
            cpu_percent=35.0,
            memory_mb=120.0,
        )
        out.append((topics.heartbeat(dev), encode(hb)))
    return out


def _publisher(host: str, port: int, items: list[tuple[str, bytes]], go: object) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    go.wait()  # type: ignore[attr-defined]
    infos = [client.publish(topic, payload, qos=QOS) for topic, payload in items]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def _drive(
    broker: MosquittoBroker,
    items: list[tuple[str, bytes]],
    publishers: int,
    done: Callable[[], int],
    label: str,
    progress: Progress,
) -> float:
    """Release the publishers and wait until ``done()`` reaches len(items). Returns s."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=_publisher, args=(broker.host, broker.port, items[i::publishers], go))
        for i in range(publishers)
    ]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # let the publishers connect before the clock starts
        task = progress.add_task(label, total=len(items))
        start = time.perf_counter()
        go.set()
        while (n := done()) < len(items):
            progress.update(task, completed=n)
            if time.perf_counter() - start > 300:
                raise RuntimeError(f"{label}: only {n}/{len(items)} after 300 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        progress.update(task, completed=len(items))
        return elapsed
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()


def _baseline(
    broker: MosquittoBroker,
    topics: Topics,
    items: list[tuple[str, bytes]],
    publishers: int,
    progress: Progress,
) -> float:
    count = 0
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal count
        with lock:
            count += 1

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-plain-sub")
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(topics.all_device("heartbeat"), qos=QOS)
    client.loop_start()
    try:
        subscribed.wait(10)
        return _drive(broker, items, publishers, lambda: count, "plain paho subscriber", progress)
    finally:
        client.disconnect()
        client.loop_stop()


def _fogline(
    broker: MosquittoBroker,
    topics: Topics,
    items: list[tuple[str, bytes]],
    publishers: int,
    progress: Progress,
    workdir: Path,
) -> tuple[float, int]:
    store = SqliteFleetStore(workdir / "fleet.sqlite3")
    monitor = FleetMonitor(MqttSettings(url=broker.url), store, topics, heartbeat_interval_s=60.0)
    try:
        monitor.start()
        time.sleep(0.5)  # SUBACK
        elapsed = _drive(
            broker,
            items,
            publishers,
            lambda: monitor.stats().applied,
            "fogline fleet monitor",
            progress,
        )
        stored = sum(d.heartbeats for d in store.devices())
        return elapsed, stored
    finally:
        monitor.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=args.json)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = MosquittoBroker(
            extra_config=["max_queued_messages 0", "max_inflight_messages 0"],
            workdir=workdir / "mosquitto",
        )
        (workdir / "mosquitto").mkdir()
        broker.start()
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                base_topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
                items = _heartbeats(base_topics, args.messages, args.devices)
                base_s = _baseline(broker, base_topics, items, args.publishers, progress)
                fog_topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
                items = _heartbeats(fog_topics, args.messages, args.devices)
                fog_s, stored = _fogline(
                    broker, fog_topics, items, args.publishers, progress, workdir
                )
        finally:
            broker.close()
    base_rate, fog_rate = args.messages / base_s, args.messages / fog_s
    result = {
        "messages": args.messages,
        "publishers": args.publishers,
        "devices": args.devices,
        "plain_paho_per_s": round(base_rate),
        "fogline_monitor_per_s": round(fog_rate),
        "ratio": round(fog_rate / base_rate, 3),
        "stored_heartbeats": stored,
    }
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title="Heartbeat ingest (same broker, same run)")
    for col in ("subscriber", "heartbeats/s", "seconds"):
        table.add_column(col)
    table.add_row("plain paho-mqtt (count only)", f"{base_rate:,.0f}", f"{base_s:.2f}")
    table.add_row("Fogline monitor (decode, validate, SQLite)", f"{fog_rate:,.0f}", f"{fog_s:.2f}")
    console.print(table)
    console.print(
        f"ratio fogline/plain = {fog_rate / base_rate:.2f}; "
        f"{stored}/{args.messages} heartbeats in the store"
    )


if __name__ == "__main__":
    main()
