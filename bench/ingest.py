"""Heartbeats per second the fleet monitor sustains, against a plain paho-mqtt subscriber.

Both runs use the same private Mosquitto, the same pre-encoded heartbeats and the same
publisher processes, one after the other in this one run:

- **baseline**: a plain paho-mqtt subscriber that only counts messages;
- **fogline**: a :class:`FleetMonitor` that decodes, validates and checks every message
  and writes it to its registry: SQLite, or with ``--store postgres`` a fresh schema in
  the PostgreSQL at ``--postgres-url`` (dropped afterwards). It is timed until the
  *store* holds every heartbeat (committed), not merely until they arrived.

Two modes, both measured for both subscribers:

- **live**: publishers release all heartbeats while the subscriber runs; rate =
  heartbeats / (last one done - publishers released). On a small machine the publisher
  processes compete with the subscriber for CPU, so this is partly a publisher figure;
- **drain**: the heartbeats are first queued by the broker in the subscriber's
  persistent session (clean session off) while it is away; the clock starts when it
  connects. This is the subscriber's own ceiling.

The broker is configured with unlimited queues so nothing is dropped and both runs count
every message.

    .venv/bin/python bench/ingest.py [--messages 20000] [--publishers 2] [--devices 200]
        [--store sqlite|postgres] [--postgres-url URL] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fogline.cloud.fleet import FleetMonitor, FleetStore, PostgresFleetStore, SqliteFleetStore
from fogline.protocol import (
    Heartbeat,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    Topics,
    encode,
)

QOS = 1
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def _postgres_schema(url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards."""
    schema = f"bench_ingest_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


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


def _publish_all(
    broker: MosquittoBroker, items: list[tuple[str, bytes]], publishers: int, go: object
) -> list[mp.process.BaseProcess]:
    """Start publisher processes; they publish once ``go`` is set. Keep ``go`` referenced
    until they are joined: its semaphore dies with the last reference."""
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = [
        ctx.Process(target=_publisher, args=(broker.host, broker.port, items[i::publishers], go))
        for i in range(publishers)
    ]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[mp.process.BaseProcess]) -> None:
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()


def _wait(
    done: Callable[[], int], total: int, label: str, progress: Progress, start: float
) -> float:
    task = progress.add_task(label, total=total)
    while (n := done()) < total:
        progress.update(task, completed=n)
        if time.perf_counter() - start > 300:
            raise RuntimeError(f"{label}: only {n}/{total} after 300 s")
        time.sleep(0.005)
    progress.update(task, completed=total)
    return time.perf_counter() - start


def _drive(
    broker: MosquittoBroker,
    items: list[tuple[str, bytes]],
    publishers: int,
    done: Callable[[], int],
    label: str,
    progress: Progress,
) -> float:
    """Live mode: release the publishers, wait until ``done()`` reaches len(items)."""
    go = mp.get_context("spawn").Event()
    procs = _publish_all(broker, items, publishers, go)
    try:
        time.sleep(1.0)  # let the publishers connect before the clock starts
        start = time.perf_counter()
        go.set()
        return _wait(done, len(items), label, progress, start)
    finally:
        _join(procs)


def _prime(
    broker: MosquittoBroker,
    client_id: str,
    topic_filter: str,
    items: list[tuple[str, bytes]],
    publishers: int,
) -> None:
    """Drain mode: create the persistent session, leave, and let the broker queue it all."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe(topic_filter, qos=QOS)
    subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    go = mp.get_context("spawn").Event()
    procs = _publish_all(broker, items, publishers, go)
    go.set()
    _join(procs)


def _baseline(
    broker: MosquittoBroker,
    topics: Topics,
    items: list[tuple[str, bytes]],
    publishers: int,
    progress: Progress,
    drain: bool,
) -> float:
    count = 0
    lock = threading.Lock()
    subscribed = threading.Event()
    client_id = f"bench-plain-{uuid.uuid4().hex[:8]}"
    topic_filter = topics.all_device("heartbeat")
    if drain:
        _prime(broker, client_id, topic_filter, items, publishers)

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal count
        with lock:
            count += 1

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not drain)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    label = f"plain paho subscriber ({'drain' if drain else 'live'})"
    try:
        start = time.perf_counter()
        client.connect(broker.host, broker.port)
        client.subscribe(topic_filter, qos=QOS)
        client.loop_start()
        if drain:
            return _wait(lambda: count, len(items), label, progress, start)
        subscribed.wait(10)
        return _drive(broker, items, publishers, lambda: count, label, progress)
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
    drain: bool,
    postgres_url: str | None,
) -> tuple[float, int]:
    client_id = f"bench-fleet-{uuid.uuid4().hex[:8]}"
    if drain:
        _prime(broker, client_id, topics.all_device("heartbeat"), items, publishers)
    store: FleetStore = (
        PostgresFleetStore(postgres_url)
        if postgres_url is not None
        else SqliteFleetStore(workdir / f"{client_id}.sqlite3")
    )
    transport = MqttTransport(
        MqttSettings(url=broker.url), client_id=client_id, clean_session=not drain
    )
    monitor = FleetMonitor(transport, store, topics, heartbeat_interval_s=60.0)
    label = f"fogline fleet monitor ({'drain' if drain else 'live'})"
    try:
        start = time.perf_counter()
        monitor.start()
        transport.connect()
        if drain:
            elapsed = _wait(lambda: monitor.stats().applied, len(items), label, progress, start)
        else:
            time.sleep(0.5)  # SUBACK
            elapsed = _drive(
                broker, items, publishers, lambda: monitor.stats().applied, label, progress
            )
        stored = sum(d.heartbeats for d in store.devices())
        return elapsed, stored
    finally:
        monitor.close()
        transport.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default=LOCAL_POSTGRES, help="with --store postgres")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=args.json)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "mosquitto").mkdir()
        broker = MosquittoBroker(
            extra_config=["max_queued_messages 0", "max_inflight_messages 0"],
            workdir=workdir / "mosquitto",
        )
        broker.start()
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                for mode in ("live", "drain"):
                    drain = mode == "drain"
                    topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
                    items = _heartbeats(topics, args.messages, args.devices)
                    base_s = _baseline(broker, topics, items, args.publishers, progress, drain)
                    topics = Topics(f"bench/{uuid.uuid4().hex[:8]}")
                    items = _heartbeats(topics, args.messages, args.devices)
                    with contextlib.ExitStack() as schema:
                        url = (
                            schema.enter_context(_postgres_schema(args.postgres_url))
                            if args.store == "postgres"
                            else None
                        )
                        fog_s, stored = _fogline(
                            broker, topics, items, args.publishers, progress, workdir, drain, url
                        )
                    if stored != args.messages:
                        raise RuntimeError(f"{mode}: {stored}/{args.messages} in the store")
                    base, fog = args.messages / base_s, args.messages / fog_s
                    results[mode] = {
                        "plain_paho_per_s": round(base),
                        "fogline_monitor_per_s": round(fog),
                        "ratio": round(fog / base, 3),
                    }
        finally:
            broker.close()
    if args.json:
        print(
            json.dumps(
                {
                    "messages": args.messages,
                    "publishers": args.publishers,
                    "devices": args.devices,
                    "store": args.store,
                    **results,
                }
            )
        )
        return
    table = Table(title=f"Heartbeat ingest, {args.messages} heartbeats (same broker, same run)")
    store = {"sqlite": "SQLite", "postgres": "PostgreSQL"}[args.store]
    for col in ("mode", "plain paho-mqtt (count only)", f"Fogline monitor (into {store})", "ratio"):
        table.add_column(col)
    for mode, r in results.items():
        table.add_row(
            mode,
            f"{r['plain_paho_per_s']:,.0f}/s",
            f"{r['fogline_monitor_per_s']:,.0f}/s",
            f"{r['ratio']:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
