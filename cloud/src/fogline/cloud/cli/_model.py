"""``fogline model``: list, show, import and publish registered models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._manifest import parse_scope
from .._pipeline import import_model
from .._publisher import load_signing_key, publish_release
from .._registry import Registry
from ._common import (
    AsJson,
    BrokerUrl,
    ConfigFile,
    DataDir,
    NoProgress,
    cli_errors,
    connect,
    emit_json,
    settings_from,
    stderr,
    stdout,
)
from ._render import (
    decisions_from_card,
    gate_table,
    measurements_from_card,
    measurements_table,
    model_table,
    models_table,
    print_pipeline_result,
)

__all__ = ["app"]

app = typer.Typer(
    name="model", help="Registered models: list, show, import, publish.", no_args_is_help=True
)

ModelRef = Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: latest)")]


@app.command("list")
def list_models(
    data_dir: DataDir = None, config: ConfigFile = None, as_json: AsJson = False
) -> None:
    """List every registered model version."""
    with cli_errors(as_json):
        records = Registry(settings_from(config, data_dir).data_dir).list_models()
    if as_json:
        emit_json([r.summary() for r in records])
    else:
        stdout.print(models_table(records))


@app.command("show")
def show(
    ref: ModelRef, data_dir: DataDir = None, config: ConfigFile = None, as_json: AsJson = False
) -> None:
    """Show one model version: variants, lineage and its model card."""
    with cli_errors(as_json):
        record = Registry(settings_from(config, data_dir).data_dir).resolve(ref)
    if as_json:
        emit_json(record.summary())
        return
    stdout.print(model_table(record))
    measurements = measurements_from_card(record.card)
    if measurements:
        batches = tuple(int(b) for b in record.card.get("batches", [1, 32]))
        stdout.print(measurements_table(measurements, batches))
        stdout.print(gate_table(decisions_from_card(record.card)))


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="An ONNX model file")],
    name: Annotated[str, typer.Option("--name", help="Model name to register it under")],
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help=".npy batch of inputs (calibration and measurement)"),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help=".npy class labels of the calibration inputs (optional)"),
    ] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    no_progress: NoProgress = False,
    as_json: AsJson = False,
) -> None:
    """Import an ONNX file: check, quantize, measure, gate and register it."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir)
        result = import_model(
            file,
            name=name,
            calibration=calibration,
            labels=labels,
            settings=settings,
            progress=not (no_progress or as_json),
            console=stderr,
        )
    if as_json:
        emit_json(result.record.summary())
        return
    print_pipeline_result(stdout, result)


@app.command("publish")
def publish(
    ref: ModelRef,
    to: Annotated[str, typer.Option("--to", help="fleet, group:NAME or device:ID")] = "fleet",
    broker: BrokerUrl = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Sign a release, publish it retained and point the scope's desired state at it."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        registry = Registry(settings.data_dir)
        # Bad input fails before the broker is touched.
        record = registry.resolve(ref)
        scope = parse_scope(to)
        key = load_signing_key(settings.data_dir)
        transport = connect(settings)
        try:
            result = publish_release(
                registry,
                record.name,
                record.version,
                transport,
                key,
                scope=scope,
                topics=settings.topics,
                chunk_size=settings.chunk_size,
                ttl_s=settings.release_ttl_days * 86400.0,
            )
        finally:
            transport.close()
    manifest = result.release.manifest
    summary = {
        "model": manifest.model,
        "version": manifest.version,
        "key_id": manifest.key_id,
        "expires_at": manifest.expires_at,
        "release_topic": result.release_topic,
        "desired_topic": result.desired_topic,
        "sequence": result.desired.desired.sequence,
        "variants": {v.device_class: v.quantization for v in manifest.variants},
    }
    if as_json:
        emit_json(summary)
        return
    stdout.print(
        f"published [bold]{manifest.model}:{manifest.version}[/bold] signed by key "
        f"{manifest.key_id}\n  release: {result.release_topic}\n  desired: "
        f"{result.desired_topic} (sequence {summary['sequence']})\n  variants: "
        + ", ".join(f"{c}={q}" for c, q in summary["variants"].items())  # type: ignore[attr-defined]
    )
