"""The production Mosquitto config in deploy/mosquitto, run for real: the shipped
``mosquitto.conf`` (paths and ports moved into tmp) with the shipped ``acl`` file, a
password file made with ``mosquitto_passwd`` and TLS material made here.

Mosquitto drops unauthorized publishes silently and filters unauthorized deliveries,
so "denied" is shown by a later message on the same connection arriving alone:
per-client ordering means anything denied-but-delivered would have come first.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from fogline.protocol import (
    BrokerUnavailableError,
    MosquittoBroker,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    Topics,
    broker_answers,
    free_port,
)

WAIT = 15.0
TOPICS = Topics()


def _load_sibling(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_production = _load_sibling("_production_broker")
PASSWORDS: dict[str, str] = _production.PASSWORDS


class Inbox:
    def __init__(self) -> None:
        self.messages: list[MqttMessage] = []
        self._cond = threading.Condition()

    def __call__(self, message: MqttMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int) -> list[tuple[str, bytes]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= count, WAIT)
            return [(m.topic, m.payload) for m in self.messages]


@dataclass
class Deployment:
    broker: MosquittoBroker
    tls_port: int
    ca: Path

    def settings(self, user: str | None, *, tls: bool = False) -> MqttSettings:
        url = f"mqtts://127.0.0.1:{self.tls_port}" if tls else self.broker.url
        return MqttSettings(
            url=url,
            username=user,
            password=PASSWORDS.get(user or ""),
            tls_ca=self.ca if tls else None,
        )


@pytest.fixture
def deployment(private_mosquitto: Callable[..., MosquittoBroker], tmp_path: Path) -> Deployment:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, _cert, _key = _load_sibling("_tls").write_tls_material(certs)
    plain, tls = free_port(), free_port()
    config = _production.production_config(tmp_path, plain, tls, certs)
    broker = private_mosquitto(config, port=plain)
    return Deployment(broker, tls, ca)


@pytest.fixture
def connect(deployment: Deployment) -> Iterator[Callable[..., MqttTransport]]:
    made: list[MqttTransport] = []

    def make(user: str | None, *, client_id: str | None = None, tls: bool = False) -> MqttTransport:
        transport = MqttTransport(deployment.settings(user, tls=tls), client_id=client_id)
        made.append(transport)
        transport.connect(timeout=WAIT)
        return transport

    try:
        yield make
    finally:
        for transport in made:
            transport.close()


def test_device_publishes_only_its_own_reports(connect: Callable[..., MqttTransport]) -> None:
    cloud = connect("fogline-cloud")
    seen = Inbox()
    for leaf in ("state", "heartbeat", "events"):
        cloud.subscribe(TOPICS.all_device(leaf), seen, wait=True)  # type: ignore[arg-type]
    device = connect("dev-1", client_id="dev-1")
    device.publish(TOPICS.heartbeat("dev-2"), b"forged", qos=1, wait=True)
    device.publish(TOPICS.device_state("dev-2"), b"forged", qos=1, wait=True)
    device.publish(TOPICS.events("dev-2"), b"forged", qos=1, wait=True)
    device.publish(TOPICS.heartbeat("dev-1"), b"mine", qos=1, wait=True)
    assert seen.wait_for(1) == [(TOPICS.heartbeat("dev-1"), b"mine")]
    device.publish(TOPICS.device_state("dev-1"), b"online", qos=1, wait=True)
    device.publish(TOPICS.events("dev-1"), b"installed", qos=1, wait=True)
    assert seen.wait_for(3)[1:] == [
        (TOPICS.device_state("dev-1"), b"online"),
        (TOPICS.events("dev-1"), b"installed"),
    ]
    cloud.publish(TOPICS.device_state("dev-1"), b"", qos=1, retain=True, wait=True)


def test_identity_is_the_username_not_the_client_id(
    connect: Callable[..., MqttTransport],
) -> None:
    cloud = connect("fogline-cloud")
    seen = Inbox()
    cloud.subscribe(TOPICS.all_device("heartbeat"), seen, wait=True)
    impostor = connect("dev-1", client_id="dev-2")  # claims dev-2's client id
    impostor.publish(TOPICS.heartbeat("dev-2"), b"forged", qos=1, wait=True)
    impostor.publish(TOPICS.heartbeat("dev-1"), b"mine", qos=1, wait=True)
    assert seen.wait_for(1) == [(TOPICS.heartbeat("dev-1"), b"mine")]


def test_device_reads_only_its_own_inbox_and_desired_state(
    connect: Callable[..., MqttTransport],
) -> None:
    device = connect("dev-1")
    got = Inbox()
    # Mosquitto 2.0 grants these subscriptions and then filters every delivery.
    device.subscribe(TOPICS.inbox_filter("dev-2"), got, wait=True)
    device.subscribe(TOPICS.device_desired("dev-2"), got, wait=True)
    device.subscribe(TOPICS.inbox_filter("dev-1"), got, wait=True)
    cloud = connect("fogline-cloud")
    cloud.publish(TOPICS.inbox("dev-2", "artifacts"), b"not yours", qos=1, wait=True)
    cloud.publish(TOPICS.device_desired("dev-2"), b"not yours", qos=1, wait=True)
    cloud.publish(TOPICS.inbox("dev-1", "artifacts"), b"chunk", qos=1, wait=True)
    assert got.wait_for(1) == [(TOPICS.inbox("dev-1", "artifacts"), b"chunk")]


def test_device_reads_releases_and_fleet_group_and_own_desired_state(
    connect: Callable[..., MqttTransport],
) -> None:
    cloud = connect("fogline-cloud")
    retained = [
        TOPICS.release("digits", 3),
        TOPICS.fleet_desired(),
        TOPICS.group_desired("canary"),
        TOPICS.device_desired("dev-1"),
    ]
    for topic in retained:
        cloud.publish(topic, b"signed", qos=1, retain=True, wait=True)
    device = connect("dev-1")
    got = Inbox()
    device.subscribe(TOPICS.all_releases(), got, wait=True)
    device.subscribe(TOPICS.fleet_desired(), got, wait=True)
    device.subscribe(TOPICS.group_desired("canary"), got, wait=True)
    device.subscribe(TOPICS.device_desired("dev-1"), got, wait=True)
    assert sorted(t for t, _ in got.wait_for(4)) == sorted(retained)


def test_device_may_request_artifacts_and_inference_but_not_publish_releases(
    connect: Callable[..., MqttTransport],
) -> None:
    cloud = connect("fogline-cloud")
    got = Inbox()
    cloud.subscribe(TOPICS.all_releases(), got, wait=True)
    cloud.subscribe(TOPICS.fleet_desired(), got, wait=True)
    cloud.subscribe(TOPICS.all_artifact_gets(), got, wait=True)
    cloud.subscribe(TOPICS.all_infer_requests(), got, wait=True)
    device = connect("dev-1")
    device.publish(TOPICS.release("digits", 99), b"forged", qos=1, wait=True)
    device.publish(TOPICS.fleet_desired(), b"forged", qos=1, wait=True)
    device.publish(TOPICS.artifact_get("a" * 64), b"get", qos=1, wait=True)
    device.publish(TOPICS.infer_requests("digits"), b"infer", qos=1, wait=True)
    assert got.wait_for(2) == [
        (TOPICS.artifact_get("a" * 64), b"get"),
        (TOPICS.infer_requests("digits"), b"infer"),
    ]


def test_tls_listener_serves_authenticated_devices(
    connect: Callable[..., MqttTransport],
) -> None:
    device = connect("dev-1", tls=True)
    got = Inbox()
    device.subscribe(TOPICS.inbox_filter("dev-1"), got, wait=True)
    connect("fogline-cloud", tls=True).publish(
        TOPICS.inbox("dev-1", "replies"), b"over tls", qos=1, wait=True
    )
    assert got.wait_for(1) == [(TOPICS.inbox("dev-1", "replies"), b"over tls")]


@pytest.mark.parametrize("user", [None, "dev-1-wrong", "nobody"])
def test_anonymous_and_unknown_clients_are_refused(
    deployment: Deployment, user: str | None
) -> None:
    settings = deployment.settings(None)
    if user is not None:
        settings = settings.model_copy(update={"username": user, "password": None})
    with pytest.raises(BrokerUnavailableError, match="refused"):
        MqttTransport(settings).connect(timeout=WAIT)
    # Still "a broker answers": development_broker() must not start a second one here.
    assert broker_answers(deployment.broker.host, deployment.broker.port)


def test_device_reads_multicast_artifact_chunks_but_cannot_forge_them(
    connect: Callable[..., MqttTransport],
) -> None:
    sha = "b" * 64
    device = connect("dev-1")
    got = Inbox()
    device.subscribe(TOPICS.artifact_chunks(sha), got, wait=True)
    other = connect("dev-2")
    other.publish(TOPICS.artifact_chunks(sha), b"forged chunk", qos=1, wait=True)
    cloud = connect("fogline-cloud")
    cloud.publish(TOPICS.artifact_chunks(sha), b"chunk", qos=1, wait=True)
    assert got.wait_for(1) == [(TOPICS.artifact_chunks(sha), b"chunk")]
