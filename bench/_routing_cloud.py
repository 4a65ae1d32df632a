"""The cloud side of ``bench/routing.py``, in its own process as in a deployment: a
local Ray with the model on Ray Serve, and the MQTT inference bridge in front of it,
publishing its replies after the injected one-way delay.

    python bench/_routing_cloud.py '<json: broker_url, prefix, model_file, model,
                                            delay_ms, by_value_calls>'

Line protocol on stdout: ``ready`` once the bridge is subscribed; then, after the parent
writes ``stop`` (or closes stdin), ``stats <json>`` with the bridge's counters. It always
stops the bridge, Serve and Ray it started.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from routing import DelayedTransport

from fogline.cloud.serving import (
    InferenceBridge,
    ServedModel,
    ServingSettings,
    deploy_model,
    ensure_ray,
    shutdown_serving,
)
from fogline.protocol import MqttSettings, Topics


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="cloud %(name)s: %(message)s")
    model = Path(cfg["model_file"]).read_bytes()
    transport: DelayedTransport | None = None
    bridge: InferenceBridge | None = None
    try:
        # Workers at niceness 0 (not Ray's 15): the replica competes on equal terms.
        ensure_ray(
            num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        deployed = deploy_model(
            ServingSettings(
                model=cfg["model"],
                version=1,
                num_cpus=0.5,
                max_batch_size=16,
                batch_wait_timeout_ms=1.0,
                by_value_calls=cfg.get("by_value_calls", True),
            ),
            model,
        )
        transport = DelayedTransport(MqttSettings(url=cfg["broker_url"]), cfg["delay_ms"] / 1e3)
        transport.connect()
        handles = {cfg["model"]: ServedModel(1, deployed.handle)}
        bridge = InferenceBridge(transport, handles, Topics(prefix=cfg["prefix"]))
        bridge.start()
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        print("stats " + json.dumps(asdict(bridge.stats)), flush=True)
    finally:
        if bridge is not None:
            bridge.close()
        if transport is not None:
            transport.close()
        try:
            shutdown_serving()
        finally:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
