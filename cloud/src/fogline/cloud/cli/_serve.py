"""``fogline cloud serve``: the long-running cloud services, until SIGINT or SIGTERM.

Services are objects with ``start()`` and ``close()``; they start in order and close in
reverse order. Add new long-running services to :func:`build_services`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Annotated, Protocol

import typer

from fogline.protocol import (
    BrokerUnavailableError,
    EmbeddedBroker,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    broker_answers,
    development_broker,
)

from .._artifacts import ArtifactService
from .._config import CloudSettings
from .._registry import Registry
from ._common import (
    AsJson,
    BrokerUrl,
    ConfigFile,
    DataDir,
    cli_errors,
    connect,
    emit_json,
    settings_from,
    setup_logging,
    stdout,
)

__all__ = ["Service", "app", "build_services"]

app = typer.Typer(name="cloud", help="Run the cloud services.", no_args_is_help=True)


class Service(Protocol):
    def start(self) -> None: ...
    def close(self) -> None: ...


def build_services(settings: CloudSettings, transport: MqttTransport) -> list[Service]:
    registry = Registry(settings.data_dir)
    return [
        ArtifactService(
            transport,
            registry.store,
            topics=settings.topics,
            share_group=settings.artifact_share_group,
            workers=settings.artifact_workers,
        )
    ]


@contextlib.contextmanager
def _dev_broker(url: str) -> Iterator[str]:
    """A broker at ``url`` if one answers; else, for a local URL, one started on that very
    port (so ``fogline model publish`` and ``mosquitto_sub`` find it with their
    defaults); else one on a free port."""
    settings = MqttSettings(url=url)
    if broker_answers(settings.host, settings.port):
        yield url
        return
    if settings.host in ("127.0.0.1", "localhost") and not settings.uses_tls:
        broker: MosquittoBroker | EmbeddedBroker
        try:
            broker = MosquittoBroker(port=settings.port)
        except BrokerUnavailableError:  # mosquitto not installed
            broker = EmbeddedBroker(port=settings.port)
        try:
            broker.start()
        except BrokerUnavailableError:
            broker.close()
        else:
            try:
                yield broker.url
            finally:
                broker.close()
            return
    with development_broker(url) as info:
        yield info.url


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@app.command("serve")
def serve(
    dev_broker: Annotated[
        bool,
        typer.Option("--dev-broker", help="Start a development broker if none answers."),
    ] = False,
    share_group: Annotated[
        str | None,
        typer.Option("--share-group", help="Serve artifacts as a replica of this shared group."),
    ] = None,
    broker: BrokerUrl = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Run the artifact service (and the other cloud services) until stopped."""
    setup_logging(verbose=not as_json)
    with cli_errors(as_json), contextlib.ExitStack() as stack:
        settings = settings_from(config, data_dir, broker)
        if share_group is not None:
            settings = settings.model_copy(update={"artifact_share_group": share_group})
        if dev_broker:
            url = stack.enter_context(_dev_broker(settings.broker_url))
            settings = settings.model_copy(update={"broker_url": url})
        stop = stack.enter_context(_stop_on_signals())
        transport = connect(settings)
        stack.callback(transport.close)
        services = build_services(settings, transport)
        for service in services:
            service.start()
            stack.callback(service.close)
        names = [type(s).__name__ for s in services]
        if as_json:
            emit_json({"event": "serving", "broker": settings.broker_url, "services": names})
        else:
            stdout.print(f"serving {', '.join(names)} on {settings.broker_url} (Ctrl-C stops)")
        stop.wait()
        if as_json:
            emit_json({"event": "stopped"})
