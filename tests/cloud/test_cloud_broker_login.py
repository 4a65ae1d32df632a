"""The cloud CLI's connection to the production broker of deploy/mosquitto (TLS, logins,
the ACL), run for real: ``broker_username``/``broker_password``/``broker_tls_ca`` from the
environment, as the RayCluster manifest sets them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from fogline.cloud import load_settings
from fogline.cloud.cli._common import connect
from fogline.cloud.fleet import load_fleet_settings
from fogline.protocol import (
    BrokerUnavailableError,
    ConfigError,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    Topics,
)


def test_the_cloud_logs_in_over_tls_and_publishes_what_only_the_cloud_may(
    production_broker: Any, tmp_path: Path
) -> None:
    env = {
        "FOGLINE_DATA_DIR": str(tmp_path / "cloud"),
        "FOGLINE_BROKER_URL": production_broker.tls_url,
        "FOGLINE_BROKER_USERNAME": "fogline-cloud",
        "FOGLINE_BROKER_PASSWORD": production_broker.passwords["fogline-cloud"],
        "FOGLINE_BROKER_TLS_CA": str(production_broker.ca),
    }
    device = MqttTransport(
        MqttSettings(
            url=production_broker.tls_url,
            username="dev-1",
            password=production_broker.passwords["dev-1"],
            tls_ca=production_broker.ca,
        )
    )
    got: list[MqttMessage] = []
    arrived = threading.Event()

    def on_message(message: MqttMessage) -> None:
        got.append(message)
        arrived.set()

    topics = Topics()
    device.subscribe(topics.fleet_desired(), on_message)
    device.connect(timeout=10)
    cloud = connect(load_settings(env=env))
    try:
        # Only the cloud's user may publish a desired state: its arrival shows the login.
        cloud.publish(topics.fleet_desired(), b"signed elsewhere", qos=1, wait=True)
        assert arrived.wait(10) and got[0].payload == b"signed elsewhere"
    finally:
        cloud.close()
        device.close()

    wrong = env | {"FOGLINE_BROKER_PASSWORD": "not-the-password"}
    with pytest.raises(BrokerUnavailableError, match="refused"):
        connect(load_settings(env=wrong))


def test_a_bad_broker_url_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings(env={"FOGLINE_BROKER_URL": "broker:1883"})


def test_the_raycluster_head_gets_the_login_of_the_production_broker() -> None:
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "raycluster.yaml"
    cluster = next(d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "RayCluster")
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (head,) = pod["containers"]
    env = {var["name"]: var.get("value", "from-the-secret") for var in head["env"]}
    mqtt = load_settings(env=env).mqtt_settings()
    assert mqtt.uses_tls and mqtt.username == "fogline-cloud" and mqtt.password is not None
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    assert str(mqtt.tls_ca).startswith(mounts["broker-ca"] + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "secret" in volumes["broker-ca"]
    # The fleet registry's PostgreSQL URL comes from an optional Secret.
    (store,) = (v for v in head["env"] if v["name"] == "FOGLINE_FLEET__STORE_URL")
    assert store["valueFrom"]["secretKeyRef"]["optional"] is True
    fleet_env = {**env, "FOGLINE_FLEET__STORE_URL": "postgresql://fleet:pw@db/fogline"}
    fleet = load_fleet_settings(env=fleet_env)
    assert fleet.store_location == "postgresql://fleet:***@db/fogline"
    assert (
        load_fleet_settings(env={k: v for k, v in env.items() if "FLEET" not in k}).store_url
        is None
    )
