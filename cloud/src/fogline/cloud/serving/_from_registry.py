"""From the registry to Ray Serve: serve a model version by its fp32 variant.

``NAME`` means the newest *published* version (what devices were told to run);
``NAME:VERSION`` pins a version, published or not (the operator asked for it). Every
reference is resolved before anything is deployed, so a typo fails fast, without
starting Ray.

Each version is its own Serve application (``fogline-<model>-v<version>``): a new
version is deployed next to the old one, the bridge switches handles, and only then is
the old application deleted, so no request meets a half-replaced deployment. Replicas of
``fogline cloud serve`` (a share group) add their ``instance`` id to the name, so one
replica stopping or moving on never deletes what another one serves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fogline.protocol import ConfigError, Identifier, UnknownModelError

from .._registry import ModelRecord, Registry, parse_model_ref
from ._deployment import DeployedModel, deploy_model, undeploy
from ._settings import ServingSettings, parse_serving_settings

__all__ = [
    "SERVED_VARIANT",
    "ModelRef",
    "deploy_record",
    "parse_served_refs",
    "resolve_served",
    "serve_models",
    "serving_settings_for",
]

log = logging.getLogger("fogline.cloud.serving")

SERVED_VARIANT = "fp32"
"""The variant the cloud serves: it has no device thread budget to trade accuracy for."""

ModelRef = tuple[str, int | None]


class _VersionedSettings(ServingSettings):
    """One Serve application per version (and serving process, when ``instance`` is
    set), so two versions can run side by side."""

    instance: Identifier | None = None

    @property
    def app_name(self) -> str:
        suffix = f"-{self.instance}" if self.instance else ""
        return f"fogline-{self.model}-v{self.version}{suffix}"


def parse_served_refs(refs: Sequence[str]) -> list[ModelRef]:
    """``["a", "b:2"]`` → ``[("a", None), ("b", 2)]``; each model at most once."""
    parsed = [parse_model_ref(ref) for ref in refs]
    names = [name for name, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"serve models: {', '.join(duplicates)} given more than once")
    return parsed


def resolve_served(registry: Registry, name: str, version: int | None = None) -> ModelRecord:
    """The record to serve: ``version``, or the newest published one; it must have an
    fp32 variant whose file is in the store."""
    if version is None:
        published = [r for r in registry.list_models(name) if r.status == "published"]
        if not published:
            registry.get(name)  # no such model at all: the registry's own message
            raise UnknownModelError(
                f"model {name} has no published version; publish one or serve {name}:VERSION"
            )
        record = published[-1]  # list_models orders by version
    else:
        record = registry.get(name, version)
    registry.artifact_path(record, SERVED_VARIANT)  # no fp32, or a missing file: say so now
    return record


def serving_settings_for(
    record: ModelRecord, options: Mapping[str, Any] | None = None, instance: str | None = None
) -> ServingSettings:
    """Serving settings for ``record`` with ``options`` (Serve tuning shared by every
    served model); a bad option is a :class:`ConfigError` naming it."""
    data = {**(options or {}), "model": record.name, "version": record.version}
    checked = parse_serving_settings(data)  # the ConfigError names the field
    return _VersionedSettings.model_validate({**checked.model_dump(), "instance": instance})


def deploy_record(
    registry: Registry,
    record: ModelRecord,
    options: Mapping[str, Any] | None = None,
    instance: str | None = None,
) -> DeployedModel:
    """Deploy ``record``'s fp32 variant on Serve (starting Serve if needed)."""
    settings = serving_settings_for(record, options, instance)
    return deploy_model(settings, registry.artifact_path(record, SERVED_VARIANT))


def serve_models(
    registry: Registry,
    refs: Sequence[str],
    options: Mapping[str, Any] | None = None,
    instance: str | None = None,
) -> dict[str, DeployedModel]:
    """Deploy every model in ``refs`` (``NAME`` or ``NAME:VERSION``); model name →
    deployment, each usable as the bridge's ``ServedModel``. All or nothing: if one
    fails, those already deployed are deleted again."""
    records = [resolve_served(registry, name, version) for name, version in parse_served_refs(refs)]
    for record in records:
        serving_settings_for(record, options)  # bad options fail before any deployment
    deployed: dict[str, DeployedModel] = {}
    try:
        for record in records:
            deployed[record.name] = deploy_record(registry, record, options, instance)
    except BaseException:
        for model in deployed.values():
            try:
                undeploy(model)
            except Exception:  # the first error is the one to report
                log.exception("could not delete the Serve app %s", model.app_name)
        raise
    return deployed
