"""Sign a registered release and publish it, with the desired state of its scope; after
a key rotation, publish the trust chain and sign again what stays retained."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fogline.protocol import (
    MqttTransport,
    RegistryError,
    SignedDesiredState,
    SignedRelease,
    SigningKey,
    Topics,
    TrustChain,
    encode,
    sign_desired,
    sign_release,
)

from ._keyring import KeyRing
from ._manifest import Scope, build_desired, build_manifest, format_scope, parse_scope
from ._registry import DesiredRecord, Registry

__all__ = [
    "PublishResult",
    "TrustPublishResult",
    "load_signing_key",
    "publish_release",
    "publish_trust",
]

log = logging.getLogger("fogline.cloud.publisher")


@dataclass(frozen=True)
class PublishResult:
    release: SignedRelease
    desired: SignedDesiredState
    release_topic: str
    desired_topic: str


@dataclass(frozen=True)
class TrustPublishResult:
    """What :func:`publish_trust` published: the chain and what it signed again."""

    chain_topic: str
    key_set_version: int
    releases: list[str]  # model:version
    desired_topics: list[str]


def load_signing_key(data_dir: Path) -> SigningKey:
    """The active cloud signing key under ``data_dir``, created (0600) on first use."""
    return KeyRing(data_dir).active


def _desired_topic(topics: Topics, scope: Scope) -> str:
    kind, target = scope
    if kind == "fleet":
        return topics.fleet_desired()
    assert target is not None
    return topics.group_desired(target) if kind == "group" else topics.device_desired(target)


def publish_release(
    registry: Registry,
    model: str,
    version: int | None,
    transport: MqttTransport,
    key: SigningKey,
    *,
    scope: str | Scope = "fleet",
    topics: Topics | None = None,
    chunk_size: int = 256 * 1024,
    ttl_s: float = 90 * 86400.0,
    timeout: float = 10.0,
    rollback: bool = False,
) -> PublishResult:
    """Sign ``model:version`` (latest if None), publish it retained (QoS 1) on its release
    topic, then point the scope's signed desired state at it (retained).

    A version older than the one the scope's desired state names is a rollback: agents
    install it only if the desired state says so (``allow_rollback``), so it needs
    ``rollback=True``; without it a :class:`RegistryError` is raised before anything is
    published. A rollback publishes the desired state first, then the release.

    Waits for the broker's acknowledgements; raises a :class:`TransportError` if the
    broker does not take them. The registry marks the version published only after both
    were acknowledged."""
    topics = topics or Topics()
    scope_t = parse_scope(scope) if isinstance(scope, str) else scope
    record = registry.get(model, version)
    current = registry.desired(*scope_t)
    current_version = None if current is None else current.models.get(record.name)
    if current_version is not None and record.version < current_version and not rollback:
        raise RegistryError(
            f"{record.ref} is older than v{current_version}, which {format_scope(scope_t)} "
            "is meant to run: publish it as a rollback (--rollback) to go back"
        )
    signed = sign_release(build_manifest(record, chunk_size=chunk_size, ttl_s=ttl_s), key)
    release_topic = topics.release(record.name, record.version)
    desired_topic = _desired_topic(topics, scope_t)
    desired_record = registry.update_desired(
        scope_t[0], scope_t[1], record.name, record.version, allow_rollback=rollback
    )
    desired = sign_desired(build_desired(desired_record), key)
    steps = [(release_topic, encode(signed)), (desired_topic, encode(desired))]
    if rollback:
        # An agent that sees the older release before the desired state allowing it
        # rejects it as a rollback; the other way round it installs it.
        steps.reverse()
    _publish_retained(transport, steps, timeout)
    registry.mark_published(record.name, record.version)
    log.info("published %s to %s (sequence %d)", record.ref, desired_topic, desired_record.sequence)
    return PublishResult(signed, desired, release_topic, desired_topic)


def _publish_retained(
    transport: MqttTransport, steps: list[tuple[str, bytes]], timeout: float
) -> None:
    for topic, payload in steps:
        transport.publish(topic, payload, qos=1, retain=True, wait=True, timeout=timeout)


def publish_trust(
    keyring: KeyRing,
    registry: Registry,
    transport: MqttTransport,
    *,
    topics: Topics | None = None,
    chunk_size: int = 256 * 1024,
    ttl_s: float = 90 * 86400.0,
    timeout: float = 10.0,
) -> TrustPublishResult:
    """Publish the trust chain (retained), then sign again with the active key every
    retained desired state and the releases they name, so that agents which have
    dropped a retired key still read them. Other retained versions keep their old
    signatures: agents ignore those once something newer is installed.

    The chain goes first: an agent that gets a message signed by a key it does not know
    yet keeps it and checks it again when its trusted keys change, but the usual order
    needs no second look. Idempotent; run it again after a failure."""
    topics = topics or Topics()
    chain: TrustChain | None = keyring.chain()
    key = keyring.active
    chain_topic = topics.fleet_keys()
    if chain is not None:
        _publish_retained(transport, [(chain_topic, encode(chain))], timeout)
    released: set[tuple[str, int]] = set()
    desired_topics: list[str] = []
    for record in registry.desired_records():
        steps = _resigned_steps(registry, record, key, topics, released, chunk_size, ttl_s)
        _publish_retained(transport, steps, timeout)
        desired_topics.append(_desired_topic(topics, (record.scope, record.target)))
    version = 0 if chain is None else chain.links[-1].key_set.version
    log.info(
        "trust chain v%d published; %d releases and %d desired states signed by %s",
        version,
        len(released),
        len(desired_topics),
        key.key_id,
    )
    return TrustPublishResult(
        chain_topic,
        version,
        [f"{m}:{v}" for m, v in sorted(released)],
        desired_topics,
    )


def _resigned_steps(
    registry: Registry,
    record: DesiredRecord,
    key: SigningKey,
    topics: Topics,
    released: set[tuple[str, int]],
    chunk_size: int,
    ttl_s: float,
) -> list[tuple[str, bytes]]:
    """A scope's releases (those not signed again yet) and then its desired state, at
    its sequence; desired state first when it holds a rollback (see publish_release)."""
    steps: list[tuple[str, bytes]] = []
    for model, version in sorted(record.models.items()):
        if (model, version) in released:
            continue
        released.add((model, version))
        manifest = build_manifest(registry.get(model, version), chunk_size=chunk_size, ttl_s=ttl_s)
        steps.append((topics.release(model, version), encode(sign_release(manifest, key))))
    desired = encode(sign_desired(build_desired(record), key))
    desired_topic = _desired_topic(topics, (record.scope, record.target))
    return (
        [(desired_topic, desired), *steps]
        if record.rollbacks
        else [*steps, (desired_topic, desired)]
    )
