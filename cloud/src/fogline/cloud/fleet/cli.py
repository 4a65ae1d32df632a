"""``fogline fleet``: fleet status, devices, one device, forgetting one, and the monitor.

``status``, ``devices`` and ``show`` read the fleet store (SQLite in the data directory,
or the PostgreSQL at ``store_url``) read-only, so they work while monitors write to it
from other processes. ``forget`` writes: it removes a decommissioned device.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.logging import RichHandler

from fogline.protocol import FoglineError, MqttTransport

from ._config import FleetSettings, load_fleet_settings
from ._monitor import FleetMonitor
from ._open import open_fleet_store
from ._render import device_detail, devices_table, summary_view
from ._select import DeviceFilter
from ._store import FleetStore
from ._summary import summarize
from ._web import FleetWebServer

__all__ = ["app"]

app = typer.Typer(
    name="fleet",
    help="Fleet health: summary, devices, and the fleet monitor.",
    no_args_is_help=True,
    add_completion=False,
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory holding fleet.sqlite3 (unless store_url names a PostgreSQL)"
        " \\[default: $FOGLINE_DATA_DIR or ./var/fogline]",
    ),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML config (\\[fleet] table or whole file)")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Watch = Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")]
Broker = Annotated[str | None, typer.Option("--broker", help="MQTT broker URL.")]
Prefix = Annotated[str | None, typer.Option("--prefix", help="Topic prefix.")]
ConnectTimeout = Annotated[
    float, typer.Option("--connect-timeout", min=0.1, help="Give up if no broker by then.")
]
Interval = Annotated[
    float, typer.Option("--interval", min=0.1, help="Seconds between refreshes with --watch.")
]
# Bounds --watch for tests and scripts; hidden because people use Ctrl-C.
WatchCount = Annotated[int | None, typer.Option("--watch-count", hidden=True, min=1)]

Frame = Callable[[FleetStore], tuple[Any, RenderableType]]


def _fail(exc: FoglineError, as_json: bool) -> NoReturn:
    if as_json:
        typer.echo(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
    else:
        Console(stderr=True).print(f"[red]error[/red] ({exc.code}): {exc.message}", markup=True)
    raise typer.Exit(1)


def _settings(config: Path | None, **overrides: Any) -> FleetSettings:
    return load_fleet_settings(
        config, overrides={k: v for k, v in overrides.items() if v is not None}
    )


@contextmanager
def _reader(config: Path | None, data_dir: Path | None) -> Iterator[FleetStore]:
    settings = _settings(config, data_dir=data_dir)
    store = open_fleet_store(settings, readonly=True)
    try:
        yield store
    finally:
        store.close()


def _show(
    frame: Frame,
    *,
    config: Path | None,
    data_dir: Path | None,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
) -> None:
    """Render once, or keep refreshing with --watch (JSON: one line per refresh)."""
    try:
        with _reader(config, data_dir) as store:
            if not watch:
                data, view = frame(store)
                if as_json:
                    typer.echo(json.dumps(data, indent=2))
                else:
                    Console().print(view)
                return
            shown = 0
            try:
                if as_json:
                    while count is None or shown < count:
                        typer.echo(json.dumps(frame(store)[0]))
                        shown += 1
                        if count is None or shown < count:
                            time.sleep(interval)
                    return
                with Live(frame(store)[1], console=Console(), auto_refresh=False) as live:
                    shown = 1
                    while count is None or shown < count:
                        time.sleep(interval)
                        live.update(frame(store)[1], refresh=True)
                        shown += 1
            except KeyboardInterrupt:
                return
    except FoglineError as exc:
        _fail(exc, as_json)


@app.command()
def status(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
    watch: Watch = False,
    interval: Interval = 2.0,
    watch_count: WatchCount = None,
) -> None:
    """Fleet summary: devices, model versions, latency, offload, budgets, attention list."""
    thresholds = None

    def frame(store: FleetStore) -> tuple[Any, RenderableType]:
        nonlocal thresholds
        if thresholds is None:
            thresholds = _settings(config, data_dir=data_dir).thresholds
        summary = summarize(store.devices(), thresholds=thresholds)
        return summary.model_dump(mode="json"), summary_view(summary)

    _show(
        frame,
        config=config,
        data_dir=data_dir,
        as_json=as_json,
        watch=watch,
        interval=interval,
        count=watch_count,
    )


@app.command()
def devices(
    offline: Annotated[bool, typer.Option("--offline", help="Only offline devices.")] = False,
    group: Annotated[str | None, typer.Option("--group", help="Only this group's devices.")] = None,
    device_class: Annotated[
        str | None, typer.Option("--class", help="Only devices of this class.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Only devices running NAME (NAME:VERSION: that version)."),
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
    watch: Watch = False,
    interval: Interval = 2.0,
    watch_count: WatchCount = None,
) -> None:
    """List the devices in the registry; the filters combine."""
    try:
        wanted = DeviceFilter.parse(
            offline=offline, group=group, device_class=device_class, model=model
        )
    except FoglineError as exc:
        _fail(exc, as_json)

    def frame(store: FleetStore) -> tuple[Any, RenderableType]:
        rows = [d for d in store.devices() if wanted.matches(d)]
        return [d.model_dump(mode="json") for d in rows], devices_table(rows)

    _show(
        frame,
        config=config,
        data_dir=data_dir,
        as_json=as_json,
        watch=watch,
        interval=interval,
        count=watch_count,
    )


@app.command()
def show(
    device_id: Annotated[str, typer.Argument(help="The device to show.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """One device: its record and recent events."""

    def frame(store: FleetStore) -> tuple[Any, RenderableType]:
        record = store.device(device_id)
        events = store.events(device_id)
        data = {
            "device": record.model_dump(mode="json"),
            "events": [e.model_dump(mode="json") for e in events],
        }
        return data, device_detail(record, events)

    _show(
        frame,
        config=config,
        data_dir=data_dir,
        as_json=as_json,
        watch=False,
        interval=1.0,
        count=None,
    )


@app.command()
def monitor(
    broker: Broker = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="HTTP port for /metrics and the page.")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option("--metrics-host")] = None,
    shared_group: Annotated[
        str | None, typer.Option("--shared-group", help="Share the load with other replicas.")
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option("--heartbeat-interval", help="Assumed until devices say.")
    ] = None,
    missed_heartbeats: Annotated[int | None, typer.Option("--missed-heartbeats")] = None,
    prefix: Prefix = None,
    connect_timeout: ConnectTimeout = 10.0,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Run the fleet monitor and its metrics server until SIGINT or SIGTERM."""
    try:
        settings = _settings(
            config,
            data_dir=data_dir,
            mqtt={"url": broker} if broker else None,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            shared_group=shared_group,
            heartbeat_interval_s=heartbeat_interval,
            missed_heartbeats=missed_heartbeats,
            topic_prefix=prefix,
        )
        _run_monitor(settings, as_json, connect_timeout)
    except FoglineError as exc:
        _fail(exc, as_json)


@app.command()
def forget(
    device_id: Annotated[str, typer.Argument(help="The device to remove.")],
    broker: Broker = None,
    prefix: Prefix = None,
    connect_timeout: ConnectTimeout = 10.0,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Remove a decommissioned device: clear its retained state on the broker, so no
    monitor registers it again, then delete it and its events from the registry. A
    device that still runs registers again with its next message."""
    try:
        settings = _settings(
            config, data_dir=data_dir, mqtt={"url": broker} if broker else None, topic_prefix=prefix
        )
        state_topic = settings.topics.device_state(device_id)  # a bad id fails here
        store = open_fleet_store(settings)
        try:
            store.device(device_id)  # an unknown id fails before the broker is touched
            transport = MqttTransport(
                settings.mqtt, client_id=f"fogline-fleet-forget-{uuid.uuid4().hex[:8]}"
            )
            try:
                transport.connect(connect_timeout)
                transport.publish(state_topic, b"", qos=1, retain=True, wait=True)
            finally:
                transport.close()
            store.forget(device_id)
        finally:
            store.close()
    except FoglineError as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(json.dumps({"forgotten": device_id, "retained_state_cleared": state_topic}))
    else:
        Console().print(f"forgot {device_id}: registry entry deleted, {state_topic} cleared")


def _run_monitor(settings: FleetSettings, as_json: bool, connect_timeout: float) -> None:
    _configure_logging(as_json)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    store = open_fleet_store(settings)
    try:
        mon = FleetMonitor(
            settings.mqtt,
            store,
            settings.topics,
            settings.heartbeat_interval_s,
            settings.missed_heartbeats,
            settings.shared_group,
        )
        web = FleetWebServer(
            store,
            settings.metrics_host,
            settings.metrics_port,
            thresholds=settings.thresholds,
            stats=mon.stats,
        )
        try:
            web.start()
            mon.start(connect_timeout)
            started = {
                "broker": settings.mqtt.url,
                "store": settings.store_location,
                "metrics_url": f"{web.url}/metrics",
                "page_url": f"{web.url}/",
            }
            if as_json:
                typer.echo(json.dumps({"event": "started", **started}))
            else:
                Console().print(
                    f"fleet monitor on [bold]{settings.mqtt.url}[/bold]; page {web.url}/, "
                    f"metrics {web.url}/metrics, store {settings.store_location}. Ctrl-C stops."
                )
            while not stop.wait(0.5):
                pass
        finally:
            mon.close()
            web.close()
        stats = mon.stats()
        if as_json:
            typer.echo(json.dumps({"event": "stopped", "stats": stats.model_dump()}))
        else:
            Console().print(
                f"stopped: {stats.applied} messages applied, "
                f"{sum(stats.rejected.values())} rejected"
            )
    finally:
        store.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _configure_logging(as_json: bool) -> None:
    root = logging.getLogger()
    if root.handlers:
        return  # the embedding program configured logging already
    handler: logging.Handler = (
        logging.StreamHandler() if as_json else RichHandler(console=Console(stderr=True))
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s")
