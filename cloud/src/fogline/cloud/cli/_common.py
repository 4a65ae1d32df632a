"""Options, output and error handling shared by the ``fogline`` commands.

Every command takes ``--json``. A :class:`FoglineError` ends the command with exit code
1 and one line (``{"error": {...}}`` on stdout with ``--json``, else on stderr), never a
traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from fogline.protocol import FoglineError, MqttTransport

from .._config import CloudSettings, load_settings

__all__ = [
    "AsJson",
    "BrokerUrl",
    "ConfigFile",
    "DataDir",
    "NoProgress",
    "cli_errors",
    "connect",
    "emit_json",
    "fail",
    "settings_from",
    "setup_logging",
    "stderr",
    "stdout",
]

stdout = Console()
stderr = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data directory \\[default: $FOGLINE_DATA_DIR or ./var/fogline]"
    ),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML config (\\[cloud] table or whole file)")
]
BrokerUrl = Annotated[
    str | None,
    typer.Option(
        "--broker", help="MQTT broker URL \\[default: $FOGLINE_BROKER_URL or mqtt://127.0.0.1:1883]"
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
NoProgress = Annotated[
    bool, typer.Option("--no-progress", help="Do not draw progress bars (also off with --json).")
]


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=stderr, show_path=False, rich_tracebacks=False))
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def fail(exc: FoglineError, as_json: bool) -> NoReturn:
    message = " ".join(exc.message.split())  # one line, whatever the cause said
    if as_json:
        typer.echo(json.dumps({"error": {"code": exc.code, "message": message}}))
    else:
        stderr.print(
            f"[red]error[/red] ({exc.code}): {message}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(1)


@contextmanager
def cli_errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except FoglineError as exc:
        fail(exc, as_json)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, sort_keys=True, default=str))


def settings_from(
    config: Path | None, data_dir: Path | None, broker: str | None = None
) -> CloudSettings:
    return load_settings(config, data_dir=data_dir, broker_url=broker)


def connect(settings: CloudSettings, timeout: float = 5.0) -> MqttTransport:
    """A connected transport; :class:`BrokerUnavailableError` if nobody answers."""
    transport = MqttTransport(settings.mqtt_settings(reconnect_min_s=0.2, reconnect_max_s=2.0))
    transport.connect(timeout=timeout)
    return transport
