"""The ``fogline`` command line: ``train``, ``model``, ``keys``, ``cloud`` and ``fleet``."""

from __future__ import annotations

import typer

from ..fleet.cli import app as fleet_app
from . import _keys, _model, _serve
from ._common import setup_logging
from ._train import train

__all__ = ["app", "main"]

app = typer.Typer(
    name="fogline",
    help="Fogline cloud tier: train, quantize, register, publish and serve models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train)
app.add_typer(_model.app, name="model")
app.add_typer(_keys.app, name="keys")
app.add_typer(_serve.app, name="cloud")
app.add_typer(fleet_app, name="fleet")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    setup_logging(verbose)


def main() -> None:
    app()
