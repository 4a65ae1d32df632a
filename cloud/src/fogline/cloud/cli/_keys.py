"""``fogline keys``: the cloud signing key that agents pin."""

from __future__ import annotations

import typer

from .._publisher import load_signing_key
from ._common import AsJson, ConfigFile, DataDir, cli_errors, emit_json, settings_from, stdout

__all__ = ["app"]

app = typer.Typer(name="keys", help="The cloud signing key.", no_args_is_help=True)


@app.command("show")
def show(data_dir: DataDir = None, config: ConfigFile = None, as_json: AsJson = False) -> None:
    """Print the public key agents pin (created on first use)."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir)
        key = load_signing_key(settings.data_dir)
    text = key.public_key.to_text()
    if as_json:
        emit_json({"public_key": text, "key_id": key.key_id})
    else:
        stdout.print(f"key id:     {key.key_id}\npublic key: {text}", highlight=False)
