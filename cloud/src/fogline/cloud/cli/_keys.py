"""``fogline keys``: the cloud signing keys agents trust, and rotating them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from fogline.protocol import KeyRotationError, TransportError

from .._config import CloudSettings
from .._key_adoption import DeviceKeys, KeyAdoption, read_key_adoption
from .._keyring import KeyRing, KeySetChange
from .._publisher import TrustPublishResult, publish_trust
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
    stdout,
)

__all__ = ["app"]

app = typer.Typer(
    name="keys",
    help="The cloud signing keys: show, rotate, retire, publish, status.",
    no_args_is_help=True,
)

Settle = Annotated[
    float,
    typer.Option("--settle", help="Seconds to wait for the retained device states.", min=0.1),
]


def _key_state(ring: KeyRing) -> dict[str, Any]:
    state, active = ring.current(), ring.active
    return {
        "key_id": active.key_id,
        "public_key": active.public_key.to_text(),
        "key_set_version": state.version,
        "trusted_keys": [{"key_id": k.key_id, "public_key": k.to_text()} for k in state.keys],
    }


@app.command("show")
def show(data_dir: DataDir = None, config: ConfigFile = None, as_json: AsJson = False) -> None:
    """Print the active public key (the one to configure agents with; created on first
    use) and the key set agents are meant to trust."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir)
        info = _key_state(KeyRing(settings.data_dir))
    if as_json:
        emit_json(info)
        return
    stdout.print(
        f"key id:     {info['key_id']}\npublic key: {info['public_key']}\n"
        f"key set:    {info['key_set_version']} ("
        + ", ".join(k["key_id"] for k in info["trusted_keys"])
        + ")",
        highlight=False,
    )


def _publish(settings: CloudSettings, ring: KeyRing, what: str) -> TrustPublishResult:
    """Publish the trust chain and sign the retained state again; a broker failure says
    that the local change stands and how to finish it."""
    try:
        transport = connect(settings)
    except TransportError as exc:
        raise TransportError(
            f"{what} is saved, but not published ({exc.message}); run `fogline keys publish` "
            "when the broker is back"
        ) from None
    try:
        return publish_trust(
            ring,
            Registry(settings.data_dir),
            transport,
            topics=settings.topics,
            chunk_size=settings.chunk_size,
            ttl_s=settings.release_ttl_days * 86400.0,
        )
    except TransportError as exc:
        raise TransportError(
            f"{what} is saved, but publishing failed ({exc.message}); run `fogline keys "
            "publish` to finish"
        ) from None
    finally:
        transport.close()


def _finish(
    settings: CloudSettings, ring: KeyRing, change: KeySetChange, *, publish: bool
) -> dict[str, Any]:
    """Publish a change made on disk (unless told not to) and summarise both."""
    published = _publish(settings, ring, f"key set {change.version}") if publish else None
    return {
        "key_set_version": change.version,
        "active_key_id": change.active_key_id,
        "retired_key_id": change.retired_key_id,
        "trusted_keys": list(change.link.key_set.keys),
        "published": published is not None,
        "resigned_releases": published.releases if published else [],
        "resigned_desired": published.desired_topics if published else [],
    }


def _print_change(summary: dict[str, Any]) -> None:
    head = (
        f"retired key {summary['retired_key_id']}"
        if summary["retired_key_id"]
        else f"new active key {summary['active_key_id']}"
    )
    stdout.print(f"{head}: key set {summary['key_set_version']}", highlight=False)
    if summary["published"]:
        stdout.print(
            f"  published the trust chain; signed again: {len(summary['resigned_releases'])} "
            f"releases, {len(summary['resigned_desired'])} desired states",
            highlight=False,
        )
    else:
        stdout.print("  not published (--no-publish): run `fogline keys publish`")


NoPublish = Annotated[
    bool, typer.Option("--no-publish", help="Change the keys on disk only; publish later.")
]


@app.command("rotate")
def rotate(
    no_publish: NoPublish = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    broker: BrokerUrl = None,
    as_json: AsJson = False,
) -> None:
    """Make a new signing key active, trusted beside the current ones (key set N+1,
    signed by the old and the new key); publish the chain and sign the retained desired
    states and their releases again with the new key."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        ring = KeyRing(settings.data_dir)
        change = ring.rotate()
        summary = _finish(settings, ring, change, publish=not no_publish)
    emit_json(summary) if as_json else _print_change(summary)


@app.command("retire")
def retire(
    key_id: Annotated[str, typer.Argument(help="The key id to stop trusting.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Retire even if some devices have not reported trusting its successor."
        ),
    ] = False,
    settle: Settle = 2.0,
    no_publish: NoPublish = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    broker: BrokerUrl = None,
    as_json: AsJson = False,
) -> None:
    """Stop trusting a key (not the active one). Refused while a device with a retained
    state has not reported trusting the key set that introduced the active key: it
    would refuse every release from then on."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        ring = KeyRing(settings.data_dir)
        if not force:
            needed = _introduced(ring)
            lagging = _read(settings, settle).lagging(needed)
            if lagging:
                names = ", ".join(f"{d.device_id} ({_shown(d)})" for d in lagging[:10])
                more = f" and {len(lagging) - 10} more" if len(lagging) > 10 else ""
                raise KeyRotationError(
                    f"{len(lagging)} devices do not trust key set {needed} yet: {names}{more}; "
                    "wait for them (`fogline keys status`) or pass --force"
                )
        change = ring.retire(key_id)
        summary = _finish(settings, ring, change, publish=not no_publish)
    emit_json(summary) if as_json else _print_change(summary)


@app.command("publish")
def publish(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    broker: BrokerUrl = None,
    as_json: AsJson = False,
) -> None:
    """Publish the trust chain and sign the retained state again (idempotent)."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        ring = KeyRing(settings.data_dir)
        result = _publish(settings, ring, "the key set")
    summary = {
        "key_set_version": result.key_set_version,
        "chain_topic": result.chain_topic,
        "resigned_releases": result.releases,
        "resigned_desired": result.desired_topics,
    }
    if as_json:
        emit_json(summary)
    else:
        stdout.print(
            f"key set {result.key_set_version} published on {result.chain_topic}; signed "
            f"again: {len(result.releases)} releases, {len(result.desired_topics)} desired states",
            highlight=False,
        )


@app.command("status")
def status(
    settle: Settle = 2.0,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    broker: BrokerUrl = None,
    as_json: AsJson = False,
) -> None:
    """Which key set each device trusts, from the retained device states; exit 1 while
    any does not trust the current one."""
    with cli_errors(as_json):
        settings = settings_from(config, data_dir, broker)
        ring = KeyRing(settings.data_dir)
        current = ring.current().version
        adoption = _read(settings, settle)
    lagging = adoption.lagging(current)
    if as_json:
        emit_json(
            {
                "key_set_version": current,
                "devices": [d.as_dict() for d in adoption.devices],
                "lagging": [d.device_id for d in lagging],
                "ignored_messages": adoption.ignored_messages,
            }
        )
    else:
        if lagging:
            table = Table(title=f"Devices not on key set {current}", title_justify="left")
            for col in ("device", "status", "key set"):
                table.add_column(col)
            for d in lagging:
                table.add_row(d.device_id, d.status, _shown(d))
            stdout.print(table)
        trusting = len(adoption.devices) - len(lagging)
        stdout.print(
            f"{trusting} of {len(adoption.devices)} devices trust key set {current}",
            highlight=False,
        )
    if lagging:
        raise typer.Exit(1)


def _shown(device: DeviceKeys) -> str:
    return "unknown" if device.key_set_version is None else str(device.key_set_version)


def _introduced(ring: KeyRing) -> int:
    """The key set version that first listed the active key (0: it was never rotated)."""
    chain, text = ring.chain(), ring.active.public_key.to_text()
    for link in chain.links if chain is not None else ():
        if text in link.key_set.keys:
            return link.key_set.version
    return 0


def _read(settings: CloudSettings, settle: float) -> KeyAdoption:
    transport = connect(settings)
    try:
        return read_key_adoption(transport, settings.topics, quiet_s=min(0.3, settle), max_s=settle)
    finally:
        transport.close()
