"""Development brokers: the configured URL when it answers, else a mosquitto child on a
free port, else (or on request) the embedded amqtt broker; whatever is started here is
stopped again (port closed, process or thread gone), even when the body raises."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import psutil
import pytest

from fogline.protocol import (
    BrokerUnavailableError,
    EmbeddedBroker,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    broker_answers,
    development_broker,
    free_port,
)


def mosquitto_children() -> set[int]:
    """PIDs of mosquitto processes this test process started (and that still run)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "mosquitto" in child.name() and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def amqtt_threads() -> set[threading.Thread]:
    """Embedded-broker threads alive now (the session's shared one may be among them)."""
    return {t for t in threading.enumerate() if t.name == "fogline-amqtt" and t.is_alive()}


def round_trip(url: str) -> None:
    """Prove the broker works: publish and receive one message."""
    got = threading.Event()
    with MqttTransport(MqttSettings(url=url)) as transport:
        transport.subscribe("fogline/test/devbroker", lambda _m: got.set(), qos=1, wait=True)
        transport.publish("fogline/test/devbroker", b"x", qos=1, wait=True)
        assert got.wait(10)


@pytest.fixture
def closed_url() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"


@pytest.fixture
def not_mqtt() -> Iterator[int]:
    """A TCP server that accepts and answers garbage: something, but not a broker."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, name="not-mqtt", daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_uses_the_configured_url_when_it_answers(mosquitto: MosquittoBroker) -> None:
    before = mosquitto_children()
    with development_broker(mosquitto.url) as info:
        assert info.kind == "external"
        assert (info.url, info.host, info.port) == (mosquitto.url, "127.0.0.1", mosquitto.port)
        assert mosquitto_children() == before  # nothing started
    assert mosquitto.running  # and nothing stopped


def test_starts_mosquitto_when_the_url_does_not_answer(closed_url: str) -> None:
    before = mosquitto_children()
    with development_broker(closed_url) as info:
        assert info.kind == "mosquitto"
        assert info.url != closed_url
        started = mosquitto_children() - before
        assert len(started) == 1
        assert broker_answers(info.host, info.port)
        round_trip(info.url)
    assert port_is_closed(info.port)
    assert not (started & mosquitto_children())
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in started
    )


def test_starts_mosquitto_without_a_url() -> None:
    with development_broker() as info:
        assert info.kind == "mosquitto"
        round_trip(info.url)
    assert port_is_closed(info.port)


def test_stops_what_it_started_when_the_body_raises(closed_url: str) -> None:
    before = mosquitto_children()
    ports: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), development_broker(closed_url) as info:
        ports.append(info.port)
        assert mosquitto_children() - before
        raise RuntimeError("boom")
    assert port_is_closed(ports[0])
    assert mosquitto_children() == before


def test_something_that_is_not_mqtt_is_not_used(not_mqtt: int) -> None:
    assert not broker_answers("127.0.0.1", not_mqtt)
    with development_broker(f"mqtt://127.0.0.1:{not_mqtt}") as info:
        assert info.kind == "mosquitto" and info.port != not_mqtt


def test_prefer_mosquitto_skips_the_url(mosquitto: MosquittoBroker) -> None:
    with development_broker(mosquitto.url, prefer="mosquitto") as info:
        assert info.kind == "mosquitto" and info.port != mosquitto.port
    assert port_is_closed(info.port)
    assert mosquitto.running


def test_prefer_amqtt_starts_and_stops_the_embedded_broker(mosquitto: MosquittoBroker) -> None:
    threads_before = amqtt_threads()
    before = mosquitto_children()
    with development_broker(mosquitto.url, prefer="amqtt") as info:
        assert info.kind == "amqtt"
        assert mosquitto_children() == before
        assert len(amqtt_threads() - threads_before) == 1
        assert broker_answers(info.host, info.port)
        round_trip(info.url)
    assert port_is_closed(info.port)
    assert amqtt_threads() == threads_before


def test_prefer_amqtt_stops_when_the_body_raises() -> None:
    threads_before = amqtt_threads()
    with pytest.raises(KeyError), development_broker(prefer="amqtt") as info:
        raise KeyError("boom")
    assert port_is_closed(info.port)
    assert amqtt_threads() == threads_before


# -- the brokers themselves --------------------------------------------------------------


def test_broker_answers() -> None:
    assert not broker_answers("127.0.0.1", free_port())
    with MosquittoBroker() as broker:
        assert broker.running
        assert broker_answers(broker.host, broker.port)
    assert not broker.running
    assert not broker_answers(broker.host, broker.port)
    assert not broker.workdir.exists()  # its own temp dir is removed


def test_mosquitto_restart_keeps_the_port() -> None:
    with MosquittoBroker() as broker:
        port, pids = broker.port, mosquitto_children()
        broker.restart()
        assert broker.port == port and broker.running
        assert mosquitto_children() != pids  # a new process
        assert broker_answers(broker.host, port)
        broker.kill()
        assert not broker.running and port_is_closed(port)
        broker.start()
        assert broker_answers(broker.host, port)


def test_mosquitto_with_a_bad_config_says_why() -> None:
    broker = MosquittoBroker(extra_config=["no_such_option on"])
    try:
        with pytest.raises(BrokerUnavailableError, match="did not start"):
            broker.start(timeout=5)
        assert not broker.running
    finally:
        broker.close()


def test_mosquitto_on_a_port_already_taken(mosquitto: MosquittoBroker) -> None:
    # The port answers, but not from our process: that must not count as started.
    broker = MosquittoBroker(port=mosquitto.port)
    try:
        with pytest.raises(BrokerUnavailableError):
            broker.start(timeout=5)
        assert not broker.running
    finally:
        broker.close()
    assert mosquitto.running and broker_answers(mosquitto.host, mosquitto.port)


def test_missing_mosquitto_executable() -> None:
    broker = MosquittoBroker(executable="/nonexistent/mosquitto")
    try:
        with pytest.raises(BrokerUnavailableError):
            broker.start(timeout=2)
    finally:
        broker.close()


def test_embedded_broker_start_stop_twice() -> None:
    threads_before = amqtt_threads()
    broker = EmbeddedBroker()
    for _ in range(2):
        broker.start()
        assert broker_answers(broker.host, broker.port)
        round_trip(broker.url)
        broker.stop()
        assert port_is_closed(broker.port)
        assert amqtt_threads() == threads_before
    broker.stop()  # idempotent


def test_embedded_broker_on_a_port_already_taken(mosquitto: MosquittoBroker) -> None:
    threads_before = amqtt_threads()
    broker = EmbeddedBroker(port=mosquitto.port)
    try:
        with pytest.raises(BrokerUnavailableError):
            broker.start(timeout=5)
    finally:
        broker.close()
    assert amqtt_threads() == threads_before
    assert mosquitto.running
