"""``fogline-sim``: run a simulated fleet of real edge agents, inject faults into it, and
list hardware profiles. Every command takes ``--json``; a :class:`FoglineError` ends a
command with exit code 1 and one line (``{"error": {...}}`` on stdout with ``--json``)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from fogline.protocol import ConfigError, FoglineError, development_broker

from ._control import send_control
from ._profiles import load_profiles
from ._scenario import load_scenario
from ._views import devices_table, fleet_tables, profiles_table

__all__ = ["app", "main"]

app = typer.Typer(
    name="fogline-sim",
    help="Simulated devices running real Fogline edge agents.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

DEFAULT_DATA_ROOT = Path(".fogline/sim")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
DataRootOpt = typer.Option(
    DEFAULT_DATA_ROOT, "--data-root", help="Where the devices keep their data (and control.json)."
)


def _fail(exc: FoglineError, as_json: bool) -> NoReturn:
    if as_json:
        out.print_json(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
    else:
        err.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    raise typer.Exit(1)


@contextlib.contextmanager
def _errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except FoglineError as exc:
        _fail(exc, as_json)


def parse_mix(text: str) -> dict[str, float]:
    """``rpi4=0.6,jetson-like=0.3`` -> ``{"rpi4": 0.6, "jetson-like": 0.3}``."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"--profile-mix: {part!r} is not name=weight") from None
    if not mix:
        raise ConfigError("--profile-mix: give at least one profile")
    return mix


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
def profiles(
    profiles_file: Path | None = typer.Option(None, "--profiles", help="Extra profiles (TOML)."),
    as_json: bool = JsonOpt,
) -> None:
    """List the hardware profiles."""
    with _errors(as_json):
        found = load_profiles(profiles_file)
    if as_json:
        out.print_json(json.dumps({n: p.model_dump(mode="json") for n, p in found.items()}))
    else:
        out.print(profiles_table(found))


@app.command()
def run(
    devices: int = typer.Option(10, "--devices", "-n", min=1, help="Number of devices."),
    profile_mix: str = typer.Option(
        "rpi4=0.6,jetson-like=0.3,mcu-gateway=0.1", "--profile-mix", help="name=weight,..."
    ),
    duration: float = typer.Option(30.0, "--duration", min=0, help="Seconds of traffic."),
    scenario_file: Path | None = typer.Option(None, "--scenario", help="Fault scenario (TOML)."),
    broker: str = typer.Option(
        "mqtt://127.0.0.1:1883",
        "--broker",
        envvar="FOGLINE_BROKER_URL",
        help="Broker URL; if none answers there, a development broker is started.",
    ),
    trusted_keys: list[str] = typer.Option(
        [], "--trusted-key", help="Release signing key (ed25519:...); repeatable."
    ),
    models: list[str] = typer.Option(["digits-cnn"], "--model", help="Model(s) to request."),
    rate: float = typer.Option(2.0, "--rate", min=0, help="Requests/s per device."),
    data_root: Path = DataRootOpt,
    seed: int = typer.Option(0, "--seed"),
    heartbeat: float = typer.Option(2.0, "--heartbeat-interval", help="Seconds."),
    topic_prefix: str = typer.Option("fogline/v1", "--topic-prefix"),
    settle: float = typer.Option(
        30.0, "--settle", min=0, help="Seconds to wait for connections and models first."
    ),
    link: bool = typer.Option(True, "--link/--no-link", help="Simulate each device's link."),
    flaps: bool = typer.Option(True, "--flaps/--no-flaps", help="Random connectivity flaps."),
    profiles_file: Path | None = typer.Option(None, "--profiles", help="Extra profiles (TOML)."),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    """Run a fleet for --duration seconds of traffic, then print its ground truth."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    from ._fleet import SimulatedFleet  # imports the edge agent and onnxruntime

    with _errors(as_json):
        scenario = load_scenario(scenario_file) if scenario_file else None
        mix = parse_mix(profile_mix)
        found = load_profiles(profiles_file)
        with development_broker(broker) as info:
            fleet = SimulatedFleet(
                profiles=found,
                scenario=scenario,
                devices=devices,
                profile_mix=mix,
                broker_url=info.url,
                trusted_keys=trusted_keys,
                data_root=data_root,
                models=models,
                seed=seed,
                rate_per_device=rate,
                heartbeat_interval_s=heartbeat,
                link_emulation=link,
                flaps=flaps,
                topic_prefix=topic_prefix,
            )
            interrupted = False
            # Progress goes to stderr with --json so stdout stays one JSON document.
            with _progress(err if as_json else out) as bar:
                try:
                    _drive(fleet, bar, duration, settle)
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    fleet.stop()
            report = fleet.report()
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        out.print(f"broker: {info.url} ({info.kind})")
        for table in fleet_tables(report):
            out.print(table)
    if interrupted:
        raise typer.Exit(130)


def _drive(fleet: Any, bar: Progress, duration: float, settle: float) -> None:
    total = fleet.config.devices
    starting = bar.add_task("starting agents", total=total, info="")
    fleet.start(lambda done, _n: bar.update(starting, completed=done), traffic=False)
    settling = bar.add_task("connecting, installing", total=None, info="")
    settled = fleet.settle(settle)
    bar.update(
        settling, total=1, completed=1, info="settled" if settled else "not settled (going on)"
    )
    fleet.start_traffic()
    running = bar.add_task("traffic", total=duration or 1, info="")
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < duration:
        sent, answered, errors = fleet.ledger.totals()
        bar.update(
            running,
            completed=elapsed,
            info=f"sent {sent}  answered {answered}  errors {errors}",
        )
        time.sleep(0.25)
    bar.update(running, completed=duration or 1)
    fleet.stop_traffic()


def _control(data_root: Path, request: dict[str, Any], as_json: bool) -> dict[str, Any]:
    with _errors(as_json):
        reply = send_control(data_root, request)
    if "error" in reply:
        error = reply["error"]
        if as_json:
            out.print_json(json.dumps(reply))
        else:
            err.print(f"[red]error[/red] ({error.get('code')}): {error.get('message')}")
        raise typer.Exit(1)
    return reply


@app.command()
def fault(
    kind: str = typer.Argument(
        ..., help="disconnect | reconnect | kill | restart | slow_link | restore_link"
    ),
    device: str = typer.Argument(..., help="Device id, e.g. sim-0003."),
    duration: float | None = typer.Option(None, "--duration", help="Undo after this many s."),
    extra_latency_ms: float | None = typer.Option(None, "--extra-latency-ms"),
    bandwidth_kbps: float | None = typer.Option(None, "--bandwidth-kbps"),
    data_root: Path = DataRootOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Inject a fault into a running `fogline-sim run` (same --data-root)."""
    request: dict[str, Any] = {"op": "fault", "kind": kind, "device": device}
    for key, value in (
        ("duration_s", duration),
        ("extra_latency_ms", extra_latency_ms),
        ("bandwidth_kbps", bandwidth_kbps),
    ):
        if value is not None:
            request[key] = value
    reply = _control(data_root, request, as_json)
    record = reply["fault"]
    if as_json:
        out.print_json(json.dumps(reply))
    elif reply["ok"]:
        out.print(f"[green]{record['kind']}[/green] {record['device_id']} at {record['at_s']:.1f}s")
    else:
        err.print(f"[red]{record['kind']} {record['device_id']} failed:[/red] {record['detail']}")
    if not reply["ok"]:
        raise typer.Exit(1)


@app.command("devices")
def list_devices(data_root: Path = DataRootOpt, as_json: bool = JsonOpt) -> None:
    """List the devices of a running `fogline-sim run` (same --data-root)."""
    reply = _control(data_root, {"op": "devices"}, as_json)
    if as_json:
        out.print_json(json.dumps(reply["devices"]))
    else:
        out.print(devices_table(reply["devices"]))


def main(argv: list[str] | None = None) -> None:
    command: Callable[..., Any] = app
    command(args=argv)
