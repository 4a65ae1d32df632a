"""deploy/kubernetes/fleet-monitor.yaml run as shipped: two replicas of the container's
command with the Deployment's environment (its Secrets filled in), against the
production Mosquitto config of deploy/mosquitto (TLS, the fogline-cloud login, the ACL)
and the machine's PostgreSQL. What a cluster would do differently is named where the
test changes it: the broker's address, the mounted CA's path and the metrics port."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fogline.cloud.fleet import PostgresFleetStore
from fogline.protocol import MqttSettings, MqttTransport, Topics, encode, free_port

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = ROOT / "deploy" / "kubernetes" / "fleet-monitor.yaml"


def _entrypoint() -> list[str]:
    text = (ROOT / "deploy" / "docker" / "Dockerfile.cloud").read_text()
    return list(json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1]))  # type: ignore[index]


def _container() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    deployment, service = docs["Deployment"], docs["Service"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, service, container


def test_the_service_selects_the_replicas_and_their_metrics_port() -> None:
    deployment, service, container = _container()
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (target,) = (p["targetPort"] for p in service["spec"]["ports"])
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert str(ports[target]) == env["FOGLINE_FLEET__METRICS_PORT"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": target}


def test_two_replicas_run_as_shipped_on_tls_and_postgres(
    production_broker: Any,
    tmp_path: Path,
    postgres_url: str,
    wait: Callable[..., None],
    heartbeat_factory: Callable[..., Any],
) -> None:
    broker = production_broker
    _deployment, _service, container = _container()
    secrets = {
        ("fogline-cloud-mqtt", "password"): broker.passwords["fogline-cloud"],
        ("fogline-fleet-db", "url"): postgres_url,
    }
    env: dict[str, str] = {}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = secrets[(ref["name"], ref["key"])] if ref else str(var["value"])
    (mount,) = container["volumeMounts"]
    assert env["FOGLINE_BROKER_URL"] == "mqtts://mosquitto:8883"
    assert env["FOGLINE_BROKER_TLS_CA"].startswith(mount["mountPath"] + "/")
    env |= {
        "FOGLINE_BROKER_URL": broker.tls_url,  # the cluster's DNS name, here
        "FOGLINE_BROKER_TLS_CA": str(broker.ca),  # the Secret mounted
        "PATH": str(Path(sys.executable).parent),  # where the image has `fogline`
        "HOME": str(tmp_path),
    }
    argv = [*_entrypoint(), *container["args"]]
    procs: list[subprocess.Popen[str]] = []
    ports = []
    try:
        for i in range(2):
            ports.append(free_port())  # two replicas on one host need two ports
            replica_env = env | {
                "FOGLINE_FLEET__METRICS_PORT": str(ports[i]),
                "FOGLINE_DATA_DIR": str(tmp_path / f"replica-{i}"),
            }
            procs.append(
                subprocess.Popen(
                    argv, env=replica_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        for proc, port in zip(procs, ports, strict=True):
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            started = json.loads(line)
            assert started["event"] == "started" and started["store"].startswith("postgresql://")
            probe = container["readinessProbe"]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=10) as resp:
                assert resp.status == 200

        topics = Topics()
        device = MqttTransport(
            MqttSettings(
                url=broker.tls_url,
                username="dev-1",
                password=broker.passwords["dev-1"],
                tls_ca=broker.ca,
            )
        )
        device.connect(timeout=10)
        try:
            for seq in range(1, 11):
                beat = heartbeat_factory("dev-1", seq, uptime_s=float(seq), requests=seq)
                device.publish(topics.heartbeat("dev-1"), encode(beat), qos=1, wait=True)
        finally:
            device.close()
        with PostgresFleetStore(postgres_url, readonly=True) as store:

            def all_stored() -> bool:
                rows = store.devices()
                return len(rows) == 1 and rows[0].heartbeats == 10

            wait(all_stored, timeout=30, what="ten heartbeats in PostgreSQL")
            assert store.device("dev-1").totals.requests == 10
        applied = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            applied.append(json.loads(out.strip().splitlines()[-1])["stats"]["applied"])
        assert sum(applied) == 10 and all(n > 0 for n in applied), applied  # shared
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
