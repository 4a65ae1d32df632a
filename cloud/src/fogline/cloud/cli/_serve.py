"""``fogline cloud serve``: the long-running cloud services, until SIGINT or SIGTERM.

The services themselves, their order and their shutdown live in
:func:`fogline.cloud.serving.start_cloud_services` (also used in-process, e.g. by the
demo); this module adds the broker, the signals and the output. It imports the serving
package (and so Ray) only when the command runs, so other commands stay quick.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fogline.protocol import (
    BrokerUnavailableError,
    ConfigError,
    EmbeddedBroker,
    MosquittoBroker,
    MqttSettings,
    broker_answers,
    development_broker,
    read_toml,
)

from .._config import CloudSettings
from ..fleet import FleetSettings, load_fleet_settings
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

if TYPE_CHECKING:
    from ..serving import CloudServices

__all__ = ["app", "fleet_settings_for"]

app = typer.Typer(name="cloud", help="Run the cloud services.", no_args_is_help=True)


def fleet_settings_for(settings: CloudSettings, config: Path | None) -> FleetSettings:
    """The fleet monitor's tuning: the config file's ``[fleet]`` table (if it has one),
    ``FOGLINE_FLEET__*``; the data dir is always the cloud's."""
    path = config if config is not None else settings.data_dir / "cloud.toml"
    has_fleet_table = False
    if path.is_file():
        with contextlib.suppress(ConfigError):  # load_settings already reported a bad file
            has_fleet_table = isinstance(read_toml(path).get("fleet"), dict)
    return load_fleet_settings(
        path if has_fleet_table else None, overrides={"data_dir": str(settings.data_dir)}
    )


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


class _SignalStop:
    """SIGINT and SIGTERM set :attr:`event`. :meth:`install` again after ``ray.init``,
    which puts its own SIGTERM handler (``sys.exit``) in place; :meth:`restore` puts
    back the handlers found first."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(s, self._handler)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_SignalStop]:
    stop = _SignalStop()
    stop.install()
    try:
        yield stop
    finally:
        stop.restore()


def _describe(services: CloudServices, broker: str) -> dict[str, Any]:
    return {
        "broker": broker,
        "services": services.names,
        "models": services.served_versions(),
        "metrics_url": services.metrics_url,
    }


@app.command("serve")
def serve(
    serve_model: Annotated[
        list[str] | None,
        typer.Option(
            "--serve-model",
            help="Serve NAME (newest published, followed) or NAME:VERSION on Ray Serve. "
            "Repeatable. Default: [cloud.serve] models.",
        ),
    ] = None,
    share_group: Annotated[
        str | None,
        typer.Option(
            "--share-group",
            help="Run as one replica of this group (artifacts, inference, fleet ingest).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", min=0, max=65535,
            help="Fleet metrics and web page port; 0 turns it off. \\[default: 9464]",
        ),
    ] = None,
    no_fleet: Annotated[
        bool, typer.Option("--no-fleet", help="Do not run the fleet monitor here.")
    ] = False,
    no_follow: Annotated[
        bool,
        typer.Option("--no-follow", help="Keep serving the versions started with."),
    ] = False,
    dev_broker: Annotated[
        bool,
        typer.Option("--dev-broker", help="Start a development broker if none answers."),
    ] = False,
    broker: BrokerUrl = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Run the artifact service, cloud inference and the fleet monitor until stopped."""
    setup_logging(verbose=not as_json)
    with cli_errors(as_json), contextlib.ExitStack() as stack:
        settings = settings_from(config, data_dir, broker)
        fleet_settings = None if no_fleet else fleet_settings_for(settings, config)
        from ..serving import check_serve_models, start_cloud_services  # imports Ray

        check_serve_models(settings, serve_model or None)  # a typo fails before connecting

        if dev_broker:
            url = stack.enter_context(_dev_broker(settings.broker_url))
            settings = settings.model_copy(update={"broker_url": url})
        stop = stack.enter_context(_stop_on_signals())
        transport = connect(settings)
        stack.callback(transport.close)
        services = start_cloud_services(
            settings,
            transport,
            serve_models=serve_model or None,
            fleet=False if no_fleet else None,
            metrics_port=metrics_port,
            share_group=share_group,
            follow_releases=False if no_follow else None,
            fleet_settings=fleet_settings,
        )
        stack.callback(services.close)
        stop.install()  # again: starting Ray replaced our SIGTERM handler
        info = _describe(services, settings.broker_url)
        if as_json:
            emit_json({"event": "serving", **info})
        else:
            models = ", ".join(f"{m} v{v}" for m, v in info["models"].items()) or "none"
            stdout.print(
                f"serving {', '.join(info['services'])} on {settings.broker_url}; "
                f"models: {models}"
                + (f"; metrics {info['metrics_url']}" if info["metrics_url"] else "")
                + " (Ctrl-C stops)"
            )
        stop.event.wait()
        if as_json:
            emit_json({"event": "stopping"})
    if as_json:
        emit_json({"event": "stopped"})
