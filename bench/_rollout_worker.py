"""One worker process of ``bench/rollout.py --processes K``: a share of the N agents (or of
the N plain paho subscribers of the floor) against the parent's broker.

    python bench/_rollout_worker.py fleet '<json>'   # SimulatedFleet, waits for a version
    python bench/_rollout_worker.py floor '<json>'   # paho subscribers, wait for the bytes

Line protocol on stdout, one line each: ``ready`` once every agent/subscriber is
connected (and subscribed), then ``done <t> <cpu>`` with ``time.monotonic()`` when the
last of them has the new version (or the bytes) and the CPU seconds this process (all
its threads) used since ``ready``, or ``error <message>``. ``CLOCK_MONOTONIC`` is
system-wide on Linux, so the parent compares ``t`` with its own publish timestamp.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fogline.firmware_sim import SimulatedFleet


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_fleet(cfg: dict[str, Any]) -> None:
    fleet = SimulatedFleet(
        devices=cfg["devices"],
        profile_mix={"jetson-like": 1.0},
        broker_url=cfg["broker_url"],
        trusted_keys=[cfg["trusted_key"]],
        data_root=Path(cfg["data_root"]),
        models=[cfg["model"]],
        topic_prefix=cfg["topic_prefix"],
        device_prefix=cfg["device_prefix"],  # unique per worker: MQTT client ids must differ
        rate_per_device=0.0,
        heartbeat_interval_s=30.0,
        link_emulation=False,
        flaps=False,
        control=False,
        agents_per_network_thread=cfg.get("agents_per_thread", 1),
    )
    try:
        fleet.start(traffic=False)
        if fleet.wait_connected(120):
            raise RuntimeError("agents did not connect")
        cpu = time.process_time()
        _say("ready")
        late = fleet.wait_for_version(cfg["model"], cfg["version"], timeout=600)
        done = time.monotonic()
        cpu = time.process_time() - cpu
        if late:
            raise RuntimeError(f"{len(late)} agents never served v{cfg['version']}: {late[:5]}")
        _say(f"done {done!r} {cpu!r}")
    finally:
        fleet.stop()


def run_floor(cfg: dict[str, Any]) -> None:
    n: int = cfg["subscribers"]
    size: int = cfg["size"]
    topic: str = cfg["topic"]
    received = threading.Semaphore(0)
    subscribed = threading.Semaphore(0)
    clients: list[paho.Client] = []

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if len(msg.payload) == size:
            received.release()

    def on_subscribe(*_a: object) -> None:
        subscribed.release()

    def on_connect(client: paho.Client, *_a: object) -> None:
        client.subscribe(topic, qos=1)

    try:
        for _ in range(n):
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-{uuid.uuid4().hex}")
            c.on_message = on_message
            c.on_connect = on_connect
            c.on_subscribe = on_subscribe
            c.connect(cfg["host"], cfg["port"])
            c.loop_start()
            clients.append(c)
        for _ in range(n):
            if not subscribed.acquire(timeout=60):
                raise RuntimeError("floor subscribers did not subscribe")
        cpu = time.process_time()
        _say("ready")
        for _ in range(n):
            if not received.acquire(timeout=300):
                raise RuntimeError("floor subscribers did not all receive")
        _say(f"done {time.monotonic()!r} {time.process_time() - cpu!r}")
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    mode, raw = sys.argv[1], sys.argv[2]
    try:
        (run_fleet if mode == "fleet" else run_floor)(json.loads(raw))
    except Exception as exc:  # reported to the parent, which stops every worker
        _say(f"error {type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
