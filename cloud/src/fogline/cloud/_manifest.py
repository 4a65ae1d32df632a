"""Build release manifests and desired states from registry records (pure, no I/O)."""

from __future__ import annotations

import time
from typing import Literal

from fogline.protocol import (
    MAX_CHUNK_SIZE,
    ConfigError,
    DesiredModel,
    DesiredState,
    RegistryError,
    ReleaseManifest,
    ReleaseVariant,
    Tensor,
    validate_id,
)

from ._registry import DesiredRecord, ModelRecord

__all__ = ["Scope", "build_desired", "build_manifest", "format_scope", "parse_scope"]

ScopeKind = Literal["fleet", "group", "device"]
Scope = tuple[ScopeKind, str | None]


def parse_scope(text: str) -> Scope:
    """``fleet``, ``group:G`` or ``device:D``."""
    if text == "fleet":
        return "fleet", None
    kind, sep, target = text.partition(":")
    if not sep or kind not in ("group", "device"):
        raise ConfigError(f"--to must be fleet, group:NAME or device:ID, got {text!r}")
    validate_id(target, f"{kind} name" if kind == "group" else "device id")
    return ("group" if kind == "group" else "device"), target


def format_scope(scope: Scope) -> str:
    """The inverse of :func:`parse_scope`."""
    kind, target = scope
    return kind if target is None else f"{kind}:{target}"


def build_manifest(
    record: ModelRecord, *, chunk_size: int = 256 * 1024, ttl_s: float = 90 * 86400.0
) -> ReleaseManifest:
    """The unsigned manifest of a registered version: one variant per device class the
    gate chose one for. ``key_id`` is filled in by :func:`fogline.protocol.sign_release`."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
    if not record.assignments:
        raise RegistryError(
            f"{record.ref} has no variant for any device class; nothing to release "
            "(see the gate decisions in its model card)"
        )
    variants = []
    for device_class, quantization in sorted(record.assignments.items()):
        v = record.variant(quantization)
        variants.append(
            ReleaseVariant(
                device_class=device_class,
                quantization=quantization,
                sha256=v.sha256,
                size=v.size,
                chunk_size=chunk_size,
                inputs=list(record.inputs),
                outputs=list(record.outputs),
            )
        )
    example = None
    if record.example_input is not None:
        example = {name: Tensor.from_numpy(arr) for name, arr in record.example_input.items()}
    metadata = {"source": record.source}
    if "recipe" in record.lineage:
        metadata["recipe"] = str(record.lineage["recipe"])[:2048]
    if "fogline_version" in record.lineage:
        metadata["fogline_version"] = str(record.lineage["fogline_version"])
    now = time.time()
    return ReleaseManifest(
        model=record.name,
        version=record.version,
        created_at=now,
        expires_at=now + ttl_s,
        key_id="unsigned",
        variants=variants,
        example_input=example,
        labels=record.labels,
        metadata=metadata,
    )


def build_desired(record: DesiredRecord, *, ttl_s: float | None = None) -> DesiredState:
    now = time.time()
    return DesiredState(
        scope=record.scope,
        target=record.target,
        sequence=record.sequence,
        issued_at=now,
        expires_at=None if ttl_s is None else now + ttl_s,
        key_id="unsigned",
        models={
            name: DesiredModel(version=v, allow_rollback=name in record.rollbacks)
            for name, v in sorted(record.models.items())
        },
    )
