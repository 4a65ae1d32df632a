"""Follow releases: when a newer version of a served model is published, serve it.

The serve process subscribes to the release topics of the models it serves unpinned.
A release is only a trigger: it must carry a valid signature from the cloud's own key
and name a version newer than the one served, and the model itself still comes from
the registry (its fp32 variant). The new version is deployed next to the old one, the
bridge switches to it, then the old deployment is deleted.

The network thread only compares version numbers (retained releases of older versions
arrive on every subscribe); signature checks and deployments run on one worker thread,
one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor

from fogline.protocol import (
    FoglineError,
    MqttMessage,
    MqttTransport,
    SignedRelease,
    TopicError,
    Topics,
    TrustStore,
    decode,
    verify_release,
)

from .._registry import Registry
from ._bridge import InferenceBridge, ServedModel
from ._deployment import DeployedModel, undeploy
from ._from_registry import deploy_record

__all__ = ["ReleaseFollower"]

log = logging.getLogger("fogline.cloud.serving")


class ReleaseFollower:
    """Redeploy ``models`` (served in ``deployed``, behind ``bridge``) on new releases.

    ``deployed`` is shared with the owner, which deletes what is in it at the end;
    ``trust`` is called per release (the signing key may be created after we start)."""

    def __init__(
        self,
        transport: MqttTransport,
        registry: Registry,
        bridge: InferenceBridge,
        deployed: MutableMapping[str, DeployedModel],
        models: Iterable[str],
        trust: Callable[[], TrustStore],
        *,
        topics: Topics | None = None,
        options: dict[str, object] | None = None,
        instance: str | None = None,
    ) -> None:
        self.transport = transport
        self.registry = registry
        self.bridge = bridge
        self.deployed = deployed
        self.models = sorted(set(models))
        self.topics = topics or Topics()
        self.options = dict(options or {})
        self.instance = instance
        self._trust = trust
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.redeployed = 0
        self.rejected = 0
        self.failed = 0

    @property
    def name(self) -> str:
        return "release-follower"

    def start(self) -> None:
        if self._pool is not None or not self.models:
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fogline-redeploy")
        for model in self.models:
            self.transport.subscribe(self.topics.releases_of(model), self._on_release, qos=1)
        log.info("following releases of %s", ", ".join(self.models))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for model in self.models:
            try:
                self.transport.unsubscribe(self.topics.releases_of(model))
            except FoglineError:
                log.debug("unsubscribe on close failed", exc_info=True)
        pool.shutdown(wait=True, cancel_futures=True)  # a redeploy under way finishes

    def served_version(self, model: str) -> int | None:
        served = self.deployed.get(model)
        return None if served is None else served.version

    # -- network thread: cheap checks only ----------------------------------------------------
    def _on_release(self, msg: MqttMessage) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except TopicError:
            self._count("rejected")
            return
        current = self.served_version(parsed.model or "")
        if parsed.version is None or current is None or parsed.version <= current:
            return  # an old (retained) release, or a model we do not follow
        pool = self._pool
        if pool is None:
            return
        try:
            pool.submit(self._redeploy, parsed.model or "", parsed.version, msg.payload)
        except RuntimeError:  # closing
            return

    # -- worker thread ----------------------------------------------------------------------------
    def _redeploy(self, model: str, version: int, payload: bytes) -> None:
        try:
            manifest = verify_release(decode(payload, SignedRelease), self._trust())
            if (manifest.model, manifest.version) != (model, version):
                raise TopicError(
                    f"release on the topic of {model}:{version} names "
                    f"{manifest.model}:{manifest.version}"
                )
        except FoglineError as exc:
            self._count("rejected")
            log.warning("ignoring release %s:%d: %s", model, version, exc.message)
            return
        old = self.deployed.get(model)
        if old is None or version <= old.version:
            return  # already serving it (or newer): releases can arrive twice
        try:
            record = self.registry.get(model, version)
            new = deploy_record(self.registry, record, self.options, self.instance)
        except FoglineError as exc:
            self._count("failed")
            log.warning("cannot serve %s:%d, still serving v%d: %s",
                        model, version, old.version, exc.message)
            return
        except Exception:  # Ray's errors, translated here only: keep serving the old one
            self._count("failed")
            log.exception("deploying %s:%d failed, still serving v%d", model, version, old.version)
            return
        self.deployed[model] = new
        self.bridge.handles[model] = ServedModel(new.version, new.handle)
        self._count("redeployed")
        log.info("now serving %s v%d (was v%d)", model, new.version, old.version)
        try:
            undeploy(old)
        except Exception:
            log.exception("could not delete the Serve app of %s v%d", model, old.version)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)
