"""MqttTransport against real brokers: Mosquitto (MQTT 3.1.1 and 5) and the embedded
amqtt broker. Each test uses its own topics, so the session brokers can be shared."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from fogline.protocol import (
    BrokerUnavailableError,
    ConfigError,
    EmbeddedBroker,
    InvalidIdError,
    MosquittoBroker,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    NotConnectedError,
    PublishError,
    SubscribeError,
    Will,
    free_port,
)

CHILD = Path(__file__).with_name("_mqtt_child.py")


def _load_sibling(name: str) -> ModuleType:
    # Test folders are not packages (pytest's importlib mode): load helpers by path.
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_tls_material = _load_sibling("_tls").write_tls_material
WAIT = 15.0  # generous: the machine is shared; this bounds a hang, it does not time anything


class Collector:
    """A handler that records messages and lets the test wait for them."""

    def __init__(self) -> None:
        self.messages: list[MqttMessage] = []
        self._cond = threading.Condition()

    def __call__(self, message: MqttMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT) -> list[MqttMessage]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert ok, f"got {len(self.messages)} of {count} messages"
            return list(self.messages)

    @property
    def payloads(self) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages]


def _topic(name: str = "t") -> str:
    return f"test/{uuid.uuid4().hex[:10]}/{name}"


@pytest.fixture(params=["mosquitto-3.1.1", "mosquitto-5", "amqtt"])
def settings(request: pytest.FixtureRequest) -> MqttSettings:
    kind, _, protocol = request.param.partition("-")
    if kind == "amqtt":
        url = request.getfixturevalue("embedded_broker").url
        return MqttSettings(url=url, reconnect_min_s=0.2, reconnect_max_s=2.0)
    url = request.getfixturevalue("mosquitto").url
    return MqttSettings(url=url, protocol=protocol, reconnect_min_s=0.2, reconnect_max_s=2.0)


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttTransport]]:
    """Factory of connected transports, all closed at the end whatever happens."""
    made: list[MqttTransport] = []

    def make(settings: MqttSettings, **kwargs: object) -> MqttTransport:
        transport = MqttTransport(settings, **kwargs)  # type: ignore[arg-type]
        made.append(transport)
        transport.connect(timeout=WAIT)
        return transport

    try:
        yield make
    finally:
        for transport in made:
            transport.close()


def _paho_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")}


# -- publish / subscribe ---------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_subscribe(
    settings: MqttSettings, clients: Callable[..., MqttTransport], qos: int
) -> None:
    topic = _topic()
    sub, pub = clients(settings), clients(settings)
    got = Collector()
    sub.subscribe(topic, got, qos=qos, wait=True)
    for i in range(5):
        pub.publish(topic, b"m%d" % i, qos=qos)
    messages = got.wait_for(5)
    assert sorted(m.payload for m in messages) == [b"m%d" % i for i in range(5)]
    assert {m.topic for m in messages} == {topic}
    assert all(m.qos == qos for m in messages)


def test_wildcard_subscription_routes_to_the_right_handler(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    base = _topic("devices")
    client = clients(settings)
    states, beats = Collector(), Collector()
    client.subscribe(f"{base}/+/state", states, wait=True)
    client.subscribe(f"{base}/+/heartbeat", beats, wait=True)
    client.publish(f"{base}/d1/state", b"s", qos=1, wait=True)
    client.publish(f"{base}/d1/heartbeat", b"h", qos=1, wait=True)
    assert states.wait_for(1)[0].payload == b"s"
    assert beats.wait_for(1)[0].payload == b"h"
    assert states.payloads == [b"s"]


def test_publish_wait_returns_after_the_broker_has_the_message(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    topic = _topic()
    pub = clients(settings)
    # Retained + wait: once publish returns, the broker holds it, so a client that
    # connects afterwards must find it.
    pub.publish(topic, b"acked", qos=1, retain=True, wait=True)
    late = clients(settings)
    got = Collector()
    late.subscribe(topic, got, wait=True)
    [message] = got.wait_for(1)
    assert message.payload == b"acked"
    assert message.retain
    pub.publish(topic, b"", qos=1, retain=True, wait=True)  # clear the retained message


def test_retained_message_reaches_later_subscribers_and_can_be_cleared(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    topic = _topic("state")
    pub = clients(settings)
    pub.publish(topic, b"online", qos=1, retain=True, wait=True)
    pub.publish(topic, b"online-2", qos=1, retain=True, wait=True)  # replaces the first
    first = Collector()
    clients(settings).subscribe(topic, first, wait=True)
    assert [m.payload for m in first.wait_for(1)] == [b"online-2"]
    assert first.messages[0].retain

    pub.publish(topic, b"", qos=1, retain=True, wait=True)
    probe = _topic("flush")
    second = Collector()
    late = clients(settings)
    late.subscribe(topic, second, wait=True)
    late.subscribe(probe, second, wait=True)
    pub.publish(probe, b"flush", qos=1, wait=True)
    # The flush message arrives after any retained message would have: none did.
    assert [m.payload for m in second.wait_for(1)] == [b"flush"]


def test_last_will_is_published_when_a_client_dies(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    will_topic = _topic("state")
    watcher = clients(settings)
    got = Collector()
    watcher.subscribe(will_topic, got, wait=True)
    child = subprocess.Popen(
        [sys.executable, str(CHILD), settings.url, settings.protocol, will_topic, "offline"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"ready\n", child.stderr.read() if child.stderr else b""
        child.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must send the will
        child.wait(WAIT)
        [message] = got.wait_for(1)
        assert message.payload == b"offline"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT)
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    watcher.publish(will_topic, b"", qos=1, retain=True, wait=True)


def test_clean_close_does_not_send_the_will(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    will_topic, probe = _topic("state"), _topic("flush")
    watcher = clients(settings)
    got = Collector()
    watcher.subscribe(will_topic, got, wait=True)
    watcher.subscribe(probe, got, wait=True)
    dying = clients(settings, will=Will(will_topic, b"offline"))
    dying.close()
    watcher.publish(probe, b"flush", qos=1, wait=True)
    assert [m.payload for m in got.wait_for(1)] == [b"flush"]


def test_a_raising_handler_does_not_stop_delivery(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    topic = _topic()
    client = clients(settings)
    got = Collector()

    def flaky(message: MqttMessage) -> None:
        if message.payload == b"boom":
            raise RuntimeError("handler bug")
        got(message)

    client.subscribe(topic, flaky, wait=True)
    for payload in (b"one", b"boom", b"two", b"boom", b"three"):
        client.publish(topic, payload, qos=1)
    assert [m.payload for m in got.wait_for(3)] == [b"one", b"two", b"three"]
    assert client.handler_errors == 2
    assert client.connected


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_publish_refused_by_the_broker(
    private_mosquitto: Callable[..., MosquittoBroker],
    clients: Callable[..., MqttTransport],
    tmp_path: Path,
    protocol: str,
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")  # anonymous clients: only allowed/#
    broker = private_mosquitto([f"acl_file {acl}"])
    client = clients(MqttSettings(url=broker.url, protocol=protocol))
    got = Collector()
    client.subscribe("allowed/#", got, wait=True)
    if protocol == "5":  # the PUBACK says "Not authorized"
        with pytest.raises(PublishError, match="Not authorized"):
            client.publish("denied/x", b"x", qos=1, wait=True)
    else:  # MQTT 3.1.1 has no way to say so: acknowledged and dropped
        client.publish("denied/x", b"x", qos=1, wait=True)
    client.publish("allowed/x", b"ok", qos=1, wait=True)  # nothing sticks to the client
    assert [m.payload for m in got.wait_for(1)] == [b"ok"]
    assert client.connected


# -- connection failures ------------------------------------------------------------------


def test_closed_port_raises_broker_unavailable() -> None:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", reconnect_min_s=0.1)
    before = _paho_threads()
    transport = MqttTransport(settings)
    with pytest.raises(BrokerUnavailableError, match="no connection"):
        transport.connect(timeout=1.0)
    assert not transport.connected
    assert _paho_threads() == before  # connect() gave up and stopped the network thread


def test_publish_and_subscribe_need_a_live_transport() -> None:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}")
    transport = MqttTransport(settings)
    with pytest.raises(NotConnectedError):
        transport.publish("a/b", b"x", qos=1, wait=True)
    with pytest.raises(NotConnectedError):
        transport.subscribe("a/b", lambda m: None, wait=True)
    transport.close()
    with pytest.raises(NotConnectedError):
        transport.publish("a/b", b"x")


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/\x00", "#/a"])
def test_invalid_filters_are_refused(mosquitto: MosquittoBroker, bad: str) -> None:
    transport = MqttTransport(MqttSettings(url=mosquitto.url))
    try:
        with pytest.raises(SubscribeError):
            transport.subscribe(bad, lambda m: None)
    finally:
        transport.close()


@pytest.mark.parametrize("bad", ["a/+", "a/#", ""])
def test_publishing_to_a_wildcard_topic_is_refused(
    mqtt_settings: MqttSettings, clients: Callable[..., MqttTransport], bad: str
) -> None:
    client = clients(mqtt_settings)
    with pytest.raises(PublishError):
        client.publish(bad, b"x", qos=1)
    assert client.connected


@pytest.mark.parametrize(
    "client_id",
    ["+", "#", "dev/1", "dev+1", "dev 1", "$SYS", "-dev", "x" * 129, "d\u00e9v", "a\x00"],
)
def test_unsafe_client_ids_are_refused(mqtt_settings: MqttSettings, client_id: str) -> None:
    with pytest.raises(InvalidIdError):
        MqttTransport(mqtt_settings, client_id=client_id)


def test_safe_client_ids_connect(
    mqtt_settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    for client_id in ["fogline-edge-dev-1", "x" * 128, f"cloud:{uuid.uuid4().hex}", "0.a_b"]:
        assert clients(mqtt_settings, client_id=client_id).client_id == client_id


def test_a_will_on_a_wildcard_topic_is_a_config_error(mqtt_settings: MqttSettings) -> None:
    with pytest.raises(ConfigError, match="will"):
        MqttTransport(mqtt_settings, will=Will("devices/+/state", b"offline"))


@pytest.fixture
def password_broker(
    private_mosquitto: Callable[..., MosquittoBroker], tmp_path: Path
) -> MosquittoBroker:
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "alice", "s3cret"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    return private_mosquitto(
        [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}"],
        port=port,
    )


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_bad_password_raises_broker_unavailable(
    password_broker: MosquittoBroker, protocol: str
) -> None:
    before = _paho_threads()
    for username, password in [("alice", "wrong"), ("mallory", "s3cret"), (None, None)]:
        settings = MqttSettings(
            url=password_broker.url, username=username, password=password, protocol=protocol
        )
        transport = MqttTransport(settings)
        # The refusal ends connect() at once; WAIT only bounds a hang.
        with pytest.raises(BrokerUnavailableError, match="refused"):
            transport.connect(timeout=WAIT)
    assert _paho_threads() == before
    good = MqttSettings(
        url=password_broker.url, username="alice", password="s3cret", protocol=protocol
    )
    with MqttTransport(good) as transport:
        assert transport.connected


# -- reconnects --------------------------------------------------------------------------------


@pytest.fixture
def restartable_broker(
    request: pytest.FixtureRequest, private_mosquitto: Callable[..., MosquittoBroker]
) -> Iterator[tuple[str, Callable[[], None]]]:
    """(url, restart) of a broker of this test's own; restart keeps the port."""
    if request.param == "amqtt":
        embedded = EmbeddedBroker()
        embedded.start()
        try:
            yield embedded.url, lambda: (embedded.stop(), embedded.start())
        finally:
            embedded.close()
    else:
        broker = private_mosquitto()
        yield broker.url, broker.restart


@pytest.mark.parametrize(
    ("restartable_broker", "protocol"),
    [("mosquitto", "3.1.1"), ("mosquitto", "5"), ("amqtt", "3.1.1")],
    indirect=["restartable_broker"],
)
def test_reconnects_and_restores_subscriptions_after_broker_restart(
    restartable_broker: tuple[str, Callable[[], None]],
    clients: Callable[..., MqttTransport],
    protocol: str,
) -> None:
    url, restart = restartable_broker
    settings = MqttSettings(url=url, protocol=protocol, reconnect_min_s=0.1, reconnect_max_s=0.5)
    topic = _topic()
    sub, pub = clients(settings), clients(settings)
    got = Collector()
    sub.subscribe(topic, got, qos=1, wait=True)
    ups: list[bool] = []
    up_again = threading.Event()

    def listener(up: bool) -> None:
        ups.append(up)
        if up:
            up_again.set()

    sub.add_connection_listener(listener)
    pub.publish(topic, b"before", qos=1, wait=True)
    got.wait_for(1)

    restart()  # same port, fresh broker: no session, no subscriptions
    assert up_again.wait(WAIT), "subscriber did not reconnect"
    assert pub.wait_connected(WAIT), "publisher did not reconnect"
    assert ups[0] is False and ups[-1] is True
    # The re-subscription is in flight right after CONNACK; retry until it lands.
    for attempt in range(50):
        pub.publish(topic, b"after-%d" % attempt, qos=1, wait=True)
        with got._cond:
            if got._cond.wait_for(lambda: len(got.messages) >= 2, timeout=0.3):
                break
    assert got.messages[0].payload == b"before"
    assert got.messages[1].payload.startswith(b"after-")


# -- shared subscriptions -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_shared_subscription_delivers_each_message_once(
    mosquitto: MosquittoBroker, clients: Callable[..., MqttTransport], protocol: str
) -> None:
    settings = MqttSettings(url=mosquitto.url, protocol=protocol)
    topic, flush = _topic("requests"), _topic("flush")
    a, b, pub = clients(settings), clients(settings), clients(settings)
    got_a, got_b, flushed_a, flushed_b = Collector(), Collector(), Collector(), Collector()
    a.subscribe(f"$share/workers/{topic}", got_a, qos=1, wait=True)
    b.subscribe(f"$share/workers/{topic}", got_b, qos=1, wait=True)
    a.subscribe(flush, flushed_a, qos=1, wait=True)
    b.subscribe(flush, flushed_b, qos=1, wait=True)
    count = 40
    for i in range(count):
        pub.publish(topic, b"%d" % i, qos=1)
    pub.publish(flush, b"flush", qos=1, wait=True)
    # Per-client ordering: once each has the flush message, it has all its shares too.
    flushed_a.wait_for(1)
    flushed_b.wait_for(1)
    received = got_a.payloads + got_b.payloads
    assert sorted(received) == sorted(b"%d" % i for i in range(count))
    assert got_a.payloads and got_b.payloads  # the broker spread them over both


# -- close ----------------------------------------------------------------------------------


def test_close_is_idempotent_and_leaves_no_thread(settings: MqttSettings) -> None:
    before = _paho_threads()
    transport = MqttTransport(settings)
    transport.connect(timeout=WAIT)
    assert len(_paho_threads() - before) == 1
    transport.close()
    transport.close()
    assert not transport.connected
    assert _paho_threads() == before
    with MqttTransport(settings) as ctx:
        assert ctx.connected
    assert _paho_threads() == before


def test_close_stops_a_transport_that_never_connected() -> None:
    before = _paho_threads()
    transport = MqttTransport(MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}"))
    transport.start()
    transport.close()
    transport.close()
    assert _paho_threads() == before


# -- subscription refusals ------------------------------------------------------------------


class RefusingBroker:
    """A minimal MQTT 3.1.1 server that accepts the connection and refuses every
    subscription with SUBACK 0x80, as brokers with subscribe ACLs do (Mosquitto 2.0's
    acl_file only filters deliveries, so it cannot show this)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="refusing-broker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._server.settimeout(0.1)  # accept() would not wake up on close()
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
        header = conn.recv(1)
        if not header:
            raise OSError("closed")
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        return header[0], body

    def _session(self, conn: socket.socket) -> None:
        try:
            while True:
                kind, body = self._read_packet(conn)
                if kind == 0x10:
                    conn.sendall(b"\x20\x02\x00\x00")  # CONNACK accepted
                elif kind == 0x82:
                    conn.sendall(b"\x90\x03" + body[:2] + b"\x80")  # SUBACK failure
                elif kind == 0xC0:
                    conn.sendall(b"\xd0\x00")  # PINGRESP
                elif kind == 0xE0:
                    return
        except (OSError, IndexError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._server.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def test_refused_subscription_raises_with_wait(clients: Callable[..., MqttTransport]) -> None:
    broker = RefusingBroker()
    try:
        client = clients(MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}"))
        with pytest.raises(SubscribeError, match="refused"):
            client.subscribe("forbidden/x", lambda m: None, wait=True)
        assert client.connected
        client.subscribe("forbidden/y", lambda m: None)  # without wait: only logged
        client.close()
    finally:
        broker.close()


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_broker(
    private_mosquitto: Callable[..., MosquittoBroker], tmp_path: Path
) -> tuple[MosquittoBroker, int, Path]:
    ca, cert, key = write_tls_material(tmp_path)
    plain, tls = free_port(), free_port()
    broker = private_mosquitto(
        [
            f"listener {plain} 127.0.0.1",  # the start-up probe speaks plain MQTT
            "allow_anonymous true",
            f"listener {tls} 127.0.0.1",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
        ],
        port=plain,
    )
    return broker, tls, ca


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_connection_with_a_pinned_ca(
    tls_broker: tuple[MosquittoBroker, int, Path],
    clients: Callable[..., MqttTransport],
    protocol: str,
) -> None:
    _broker, tls_port, ca = tls_broker
    settings = MqttSettings(url=f"mqtts://127.0.0.1:{tls_port}", tls_ca=ca, protocol=protocol)
    assert settings.uses_tls
    client = clients(settings)
    topic = _topic()
    got = Collector()
    client.subscribe(topic, got, wait=True)
    client.publish(topic, b"over tls", qos=1, wait=True)
    assert got.wait_for(1)[0].payload == b"over tls"


def test_tls_refuses_a_server_signed_by_an_unknown_ca(
    tls_broker: tuple[MosquittoBroker, int, Path], tmp_path: Path
) -> None:
    _broker, tls_port, _ca = tls_broker
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = write_tls_material(other)
    settings = MqttSettings(url=f"mqtts://127.0.0.1:{tls_port}", tls_ca=other_ca)
    before = _paho_threads()
    with pytest.raises(BrokerUnavailableError):
        MqttTransport(settings).connect(timeout=2.0)
    assert _paho_threads() == before


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    settings = MqttSettings(url="mqtts://127.0.0.1:8883", tls_ca=tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="TLS"):
        MqttTransport(settings)


def test_bad_client_certificate_settings_are_config_errors(tmp_path: Path) -> None:
    ca, cert, key = write_tls_material(tmp_path)
    url = "mqtts://127.0.0.1:8883"
    for bad in [
        {"tls_ca": ca, "tls_key": key},  # a key without its certificate
        {"tls_ca": ca, "tls_cert": tmp_path / "absent.crt", "tls_key": key},
        {"tls_ca": ca, "tls_cert": cert, "tls_key": ca},  # not the certificate's key
        {"tls_ca": key},  # not a CA certificate
    ]:
        with pytest.raises(ConfigError, match="TLS"):
            MqttTransport(MqttSettings(url=url, **bad))  # type: ignore[arg-type]


# -- subscriptions made before connecting, and settings ------------------------------------


def test_subscriptions_made_before_connecting_are_sent_on_connect(
    settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    topic = _topic()
    early = MqttTransport(settings)
    try:
        got = Collector()
        early.subscribe(topic, got, qos=1)  # not connected yet: queued for the CONNACK
        early.connect(timeout=WAIT)
        pub = clients(settings)
        for attempt in range(50):  # the SUBSCRIBE may still be in flight after CONNACK
            pub.publish(topic, b"hello-%d" % attempt, qos=1, wait=True)
            with got._cond:
                if got._cond.wait_for(lambda: bool(got.messages), timeout=0.3):
                    break
        assert got.messages[0].payload.startswith(b"hello-")
    finally:
        early.close()


def test_subscribe_rejects_a_bad_qos(mqtt_settings: MqttSettings) -> None:
    transport = MqttTransport(mqtt_settings)
    try:
        with pytest.raises(SubscribeError, match="qos"):
            transport.subscribe("a/b", lambda m: None, qos=3)
    finally:
        transport.close()


def test_settings_reject_inverted_backoff_and_bad_urls() -> None:
    with pytest.raises(ValidationError, match="reconnect_min_s"):
        MqttSettings(reconnect_min_s=10, reconnect_max_s=1)
    for url in ["http://broker", "mqtt://", "mqtt://host:99999", "broker:1883"]:
        with pytest.raises(ValidationError, match="url"):
            MqttSettings(url=url)
    with pytest.raises(ValidationError, match="extra"):
        MqttSettings(url="mqtt://h:1", hostname="x")  # type: ignore[call-arg]
    assert MqttSettings(url="mqtts://h").port == 8883
    assert MqttSettings(url="mqtt://h").port == 1883


def test_a_raising_connection_listener_is_counted(
    mqtt_settings: MqttSettings, clients: Callable[..., MqttTransport]
) -> None:
    transport = MqttTransport(mqtt_settings)
    called = threading.Event()

    def listener(up: bool) -> None:
        called.set()
        raise RuntimeError("listener bug")

    transport.add_connection_listener(listener)
    try:
        transport.connect(timeout=WAIT)
        assert called.wait(WAIT)
        assert transport.handler_errors == 1
        assert transport.connected
    finally:
        transport.close()
