"""``fogline model``: list, show, import and publish registered models."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from fogline.protocol import ConfigError

from .._keyring import KeyRing
from .._manifest import parse_scope
from .._pipeline import import_model
from .._publisher import PublishResult, load_signing_key, publish_release
from .._registry import Registry
from .._rollout import RolloutStatus, RolloutTracker, RolloutWatch
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
from ._rollout_view import follow_rollout, rollout_line, rollout_table

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
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="Go back to an older version: the desired state allows the agents to "
            "install it (without this, an older version than the scope's is refused).",
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Follow the rollout until every online device in the scope runs the "
            "version (or failed), with a progress bar; exit 1 unless it completes.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.0, help="Seconds --wait waits at most.")
    ] = 300.0,
    max_failures: Annotated[
        int | None,
        typer.Option(
            "--max-failures",
            min=0,
            help="With --wait: abort once more devices than this failed to install "
            "\\[default: never abort; 0 with --rollback-on-failure]",
        ),
    ] = None,
    rollback_on_failure: Annotated[
        bool,
        typer.Option(
            "--rollback-on-failure",
            help="With --wait: if the rollout aborts, publish the scope's previous version "
            "again as a signed rollback.",
        ),
    ] = False,
    broker: BrokerUrl = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    no_progress: NoProgress = False,
    as_json: AsJson = False,
) -> None:
    """Sign a release, publish it retained and point the scope's desired state at it;
    with --wait, follow the rollout (and roll it back if it fails)."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        registry = Registry(settings.data_dir)
        # Bad input fails before the broker is touched.
        record = registry.resolve(ref)
        scope = parse_scope(to)
        if (rollback_on_failure or max_failures is not None) and not wait:
            raise ConfigError("--max-failures and --rollback-on-failure need --wait")
        if rollback_on_failure and max_failures is None:
            max_failures = 0
        previous = registry.desired(*scope)
        previous_version = None if previous is None else previous.models.get(record.name)
        key = load_signing_key(settings.data_dir)

        def publish_version(version: int, as_rollback: bool) -> PublishResult:
            return publish_release(
                registry,
                record.name,
                version,
                transport,
                key,
                scope=scope,
                topics=settings.topics,
                chunk_size=settings.chunk_size,
                ttl_s=settings.release_ttl_days * 86400.0,
                rollback=as_rollback,
            )

        status: RolloutStatus | None = None
        rolled_back_to: int | None = None
        transport = connect(settings)
        try:
            with contextlib.ExitStack() as stack:
                if wait:
                    tracker = RolloutTracker(
                        record.name,
                        record.version,
                        scope,
                        record.assignments,
                        topics=settings.topics,
                        trust=KeyRing(settings.data_dir).trust(),
                    )
                    watch = stack.enter_context(RolloutWatch(transport, tracker))
                    watch.settle()  # the retained device states first: who is in the scope
                result = publish_version(record.version, rollback)
                if wait:
                    tracker.restart_clock()
                    status = follow_rollout(
                        watch,
                        timeout_s=timeout,
                        max_failures=max_failures,
                        progress=not (no_progress or as_json),
                        console=stderr,
                    )
            aborted = status is not None and status.result == "aborted"
            if aborted and rollback_on_failure and previous_version not in (None, record.version):
                assert previous_version is not None
                publish_version(previous_version, previous_version < record.version)
                rolled_back_to = previous_version
        finally:
            transport.close()
    summary = _publish_summary(result)
    if status is not None:
        summary["rollout"] = status.summary()
        summary["rolled_back_to"] = rolled_back_to
    if as_json:
        emit_json(summary)
    else:
        _print_publish(summary)
        if status is not None:
            table = rollout_table(status)
            if table is not None:
                stdout.print(table)
            stdout.print(rollout_line(status))
            if status.result == "aborted":
                stdout.print(
                    f"rolled back {to} to {record.name}:{rolled_back_to}"
                    if rolled_back_to is not None
                    else "not rolled back: "
                    + (
                        "no previous version in this scope"
                        if rollback_on_failure
                        else "pass --rollback-on-failure to roll back automatically"
                    )
                )
    if status is not None and status.result != "complete":
        raise typer.Exit(1)


def _publish_summary(result: PublishResult) -> dict[str, Any]:
    manifest = result.release.manifest
    return {
        "model": manifest.model,
        "version": manifest.version,
        "key_id": manifest.key_id,
        "expires_at": manifest.expires_at,
        "release_topic": result.release_topic,
        "desired_topic": result.desired_topic,
        "sequence": result.desired.desired.sequence,
        "rollback": any(m.allow_rollback for m in result.desired.desired.models.values()),
        "variants": {v.device_class: v.quantization for v in manifest.variants},
    }


def _print_publish(summary: dict[str, Any]) -> None:
    variants: dict[str, str] = summary["variants"]
    stdout.print(
        f"published [bold]{summary['model']}:{summary['version']}[/bold]"
        + (" as a rollback" if summary["rollback"] else "")
        + f" signed by key {summary['key_id']}\n  release: {summary['release_topic']}\n"
        f"  desired: {summary['desired_topic']} (sequence {summary['sequence']})\n"
        "  variants: " + ", ".join(f"{c}={q}" for c, q in variants.items())
    )
