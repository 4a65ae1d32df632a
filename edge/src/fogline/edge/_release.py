"""Model delivery: desired state, release verification, download, install, swap.

Handlers (network thread) decode and verify, then hand a model name to one worker
thread, which decides what to run and does the slow work. Before any byte is fetched a
release must carry a valid signature by a pinned key, be unexpired, be newer than the
installed version (unless a signed desired state asks for this version with
``allow_rollback``) and have a variant for this device class. After the download the
whole-file hash is checked, the model is loaded, warmed and self-tested, and only then
committed to the store and swapped in. Any failure leaves the old model serving and is
reported as a :class:`DeviceEvent` with a stable ``reason``.

Retained releases re-delivered at subscribe time whose version is not newer than the
installed one are ignored silently: every old version stays retained on its topic, and
reporting all of them at every restart would drown the real rejections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fogline.protocol import (
    ArtifactError,
    DecodeError,
    DesiredModel,
    DesiredState,
    EventKind,
    InvalidModelError,
    MqttMessage,
    MqttTransport,
    ReleaseManifest,
    ReleaseRejectedError,
    SignatureError,
    SignedDesiredState,
    SignedRelease,
    TensorSpec,
    TopicError,
    TrustStore,
    decode,
    verify_desired,
    verify_release,
)

from ._config import AgentConfig
from ._download import ArtifactFetcher, DownloadStoppedError
from ._runtime import LoadedModel, self_test
from ._store import InstalledModel, ModelStore, atomic_write
from ._telemetry import Telemetry

__all__ = ["Loader", "ReleaseManager"]

log = logging.getLogger("fogline.edge.release")

Loader = Callable[
    [str, int, str, Path, Sequence[TensorSpec] | None, Sequence[TensorSpec] | None], LoadedModel
]
_RETRYABLE = frozenset({"download_failed"})
_MAX_RETRY_S = 600.0


class ReleaseManager:
    """Follows desired state and releases for one agent and installs what it should run."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        transport: MqttTransport,
        store: ModelStore,
        fetcher: ArtifactFetcher,
        telemetry: Telemetry,
        trust: TrustStore,
        clock: Callable[[], float],
        installed_version: Callable[[str], int | None],
        load: Loader,
        activate: Callable[[LoadedModel], None],
    ) -> None:
        self._config = config
        self._topics = config.topics
        self._transport = transport
        self._store = store
        self._fetcher = fetcher
        self._telemetry = telemetry
        self._trust = trust
        self._clock = clock
        self._installed_version = installed_version
        self._load = load
        self._activate = activate
        self._lock = threading.Lock()
        self._desired: dict[str, DesiredState] = {}  # scope key -> verified desired state
        self._sequences_path = store.root / "desired_sequences.json"
        self._sequences = self._load_sequences()
        self._sequences_dirty = False  # _sequences holds news not on disk yet
        self._releases: dict[str, dict[int, ReleaseManifest]] = {}
        self._seen: set[tuple[str, int, bytes]] = set()
        self._failed: dict[tuple[str, int, str], str] = {}  # -> reason
        self._retry_at: dict[tuple[str, int, str], float] = {}  # retryable failures
        self._attempts: dict[tuple[str, int, str], int] = {}
        self._rollback_reported: set[tuple[str, int]] = set()
        # The latest message per topic refused only for an unknown key: replayed when
        # the trusted keys change (a rotation may arrive after what it signed).
        self._unknown_key: dict[str, Callable[[], None]] = {}
        self._subscribed: set[str] = set()
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.installs = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        t = self._topics
        self._transport.subscribe(t.fleet_desired(), lambda m: self._on_desired(m, "fleet"), qos=1)
        for group in self._config.groups:
            self._transport.subscribe(
                t.group_desired(group), self._desired_handler(f"group:{group}")
            )
        self._transport.subscribe(
            t.device_desired(self._config.device_id), lambda m: self._on_desired(m, "device"), qos=1
        )
        for model in self._config.models or self._store.installed_models():
            self._follow(model)
        self._transport.add_connection_listener(self._on_connection)
        self._thread = threading.Thread(
            target=self._work, name=f"delivery-{self._config.device_id}", daemon=True
        )
        self._thread.start()

    def _desired_handler(self, scope_key: str) -> Callable[[MqttMessage], None]:
        return lambda msg: self._on_desired(msg, scope_key)

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._thread is None or not self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._save_sequences()

    def desired(self) -> dict[str, DesiredModel]:
        """The merged desired state: device over group (in config order) over fleet."""
        with self._lock:
            scopes = [self._desired.get("fleet")]
            scopes += [self._desired.get(f"group:{g}") for g in reversed(self._config.groups)]
            scopes.append(self._desired.get("device"))
        merged: dict[str, DesiredModel] = {}
        for state in scopes:
            if state is not None:
                merged.update(state.models)
        return merged

    # -- helpers --------------------------------------------------------------------------------
    def _serves(self, model: str) -> bool:
        return self._config.models is None or model in self._config.models

    def _follow(self, model: str) -> None:
        if model in self._subscribed or not self._serves(model):
            return
        self._subscribed.add(model)
        self._transport.subscribe(self._topics.releases_of(model), self._on_release, qos=1)

    def _load_sequences(self) -> dict[str, int]:
        try:
            raw = json.loads(self._sequences_path.read_text())
            return {str(k): int(v) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def _save_sequences(self) -> None:
        """Record the desired-state sequences durably (worker thread): before anything
        is installed on a desired state's word, so that after a restart a replayed older
        one is still refused as stale."""
        with self._lock:
            if not self._sequences_dirty:
                return
            data = json.dumps(self._sequences).encode()
            self._sequences_dirty = False
        try:
            atomic_write(self._sequences_path, data)
        except OSError:
            with self._lock:
                self._sequences_dirty = True
            raise

    def _on_connection(self, up: bool) -> None:
        if up:  # downloads that failed for want of a connection get another chance
            with self._lock:
                for key in [k for k, r in self._failed.items() if r in _RETRYABLE]:
                    del self._failed[key]
                models = set(self._releases)
            for model in models:
                self._jobs.put(model)

    # -- desired state (network thread) ------------------------------------------------------
    def _on_desired(self, msg: MqttMessage, scope_key: str) -> None:
        self._forget_unknown_key(msg.topic)
        if not msg.payload:  # the retained desired state of this scope was cleared
            with self._lock:
                cleared = self._desired.pop(scope_key, None)
            for model in cleared.models if cleared is not None else ():
                self._jobs.put(model)
            return
        try:
            signed = decode(msg.payload, SignedDesiredState)
        except DecodeError as exc:
            self._telemetry.event("desired_rejected", reason="malformed", detail=exc.message)
            return
        try:
            state = verify_desired(signed, self._trust)
        except SignatureError as exc:
            reason = "unknown_key" if signed.desired.key_id not in self._trust else "bad_signature"
            if reason == "unknown_key":
                self._keep_for_new_keys(msg.topic, lambda: self._on_desired(msg, scope_key))
            self._telemetry.event("desired_rejected", reason=reason, detail=exc.message)
            return
        scope, _, target = scope_key.partition(":")
        expected_target = self._config.device_id if scope == "device" else (target or None)
        if state.scope != scope or (scope != "fleet" and state.target != expected_target):
            self._telemetry.event(
                "desired_rejected",
                reason="wrong_target",
                detail=f"{state.scope} desired state for {state.target!r} on the {scope_key} topic",
            )
            return
        if state.expires_at is not None and state.expires_at < self._clock():
            self._telemetry.event(
                "desired_rejected",
                reason="expired",
                detail=f"{scope_key} sequence {state.sequence}",
            )
            return
        with self._lock:
            last = self._sequences.get(scope_key)
            if last is not None and state.sequence < last:
                stale = True
            else:
                stale = False
                self._desired[scope_key] = state
                if last != state.sequence:
                    # Recorded durably by the worker (_save_sequences), before it acts
                    # on this state: an fsync here would hold up the network thread.
                    self._sequences[scope_key] = state.sequence
                    self._sequences_dirty = True
        if stale:
            self._telemetry.event(
                "desired_rejected",
                reason="stale",
                detail=f"{scope_key} sequence {state.sequence} < {last}",
            )
            return
        log.info("desired state %s sequence %d: %s", scope_key, state.sequence, state.models)
        for model in state.models:
            if self._serves(model):
                self._follow(model)
                self._jobs.put(model)

    # -- releases (network thread) ------------------------------------------------------------
    def _on_release(self, msg: MqttMessage) -> None:
        self._forget_unknown_key(msg.topic)
        if not msg.payload:
            return
        try:
            parsed = self._topics.parse(msg.topic)
        except TopicError:
            return
        model, version = parsed.model, parsed.version
        assert model is not None and version is not None
        installed = self._installed_version(model)
        # Old retained history is still recorded (a signed rollback may ask for it) but
        # its rejections are not reported; see the module docstring.
        quiet = msg.retain and installed is not None and version <= installed
        try:
            signed = decode(msg.payload, SignedRelease)
        except DecodeError as exc:
            self._reject(model, version, "malformed", exc.message, quiet)
            return
        key = (model, version, signed.signature)
        if key in self._seen:
            return
        self._seen.add(key)
        manifest = signed.manifest
        try:
            verify_release(signed, self._trust)
        except SignatureError as exc:
            reason = "unknown_key" if manifest.key_id not in self._trust else "bad_signature"
            if reason == "unknown_key":
                self._seen.discard(key)
                self._keep_for_new_keys(msg.topic, lambda: self._on_release(msg))
            self._reject(model, version, reason, exc.message, quiet)
            return
        if manifest.model != model or manifest.version != version:
            detail = f"manifest names {manifest.model} v{manifest.version}"
            self._reject(model, version, "wrong_topic", detail, quiet)
            return
        if manifest.expires_at < self._clock():
            self._reject(model, version, "expired", f"expired at {manifest.expires_at:.0f}", quiet)
            return
        if manifest.variant_for(self._config.device_class) is None:
            classes = sorted(v.device_class for v in manifest.variants)
            detail = f"no variant for {self._config.device_class}; has {classes}"
            self._reject(model, version, "wrong_device_class", detail, quiet)
            return
        if (
            installed is not None
            and version < installed
            and not quiet
            and not self._rollback_allowed(model, version)
        ):
            self._rollback_reported.add((model, version))
            detail = f"v{version} is older than the installed v{installed}"
            self._reject(model, version, "rollback", detail)
        with self._lock:
            self._releases.setdefault(model, {})[version] = manifest
        self._jobs.put(model)

    # -- key rotation ---------------------------------------------------------------------------
    _MAX_UNKNOWN_KEY = 256

    def _keep_for_new_keys(self, topic: str, replay: Callable[[], None]) -> None:
        with self._lock:
            self._unknown_key.pop(topic, None)
            self._unknown_key[topic] = replay
            while len(self._unknown_key) > self._MAX_UNKNOWN_KEY:
                del self._unknown_key[next(iter(self._unknown_key))]

    def _forget_unknown_key(self, topic: str) -> None:
        if self._unknown_key:
            with self._lock:
                self._unknown_key.pop(topic, None)

    def trust_changed(self) -> None:
        """The trusted keys changed: check again what only an unknown key refused."""
        with self._lock:
            replays = list(self._unknown_key.values())
            self._unknown_key.clear()
        for replay in replays:
            replay()

    def _rollback_allowed(self, model: str, version: int) -> bool:
        want = self.desired().get(model)
        return want is not None and want.version == version and want.allow_rollback

    def _reject(
        self, model: str, version: int, reason: str, detail: str, quiet: bool = False
    ) -> None:
        if quiet:
            log.debug("old retained release %s v%d ignored: %s: %s", model, version, reason, detail)
            return
        log.warning("release %s v%d rejected: %s: %s", model, version, reason, detail)
        self._telemetry.event(
            "release_rejected", model=model, version=version, reason=reason, detail=detail
        )

    # -- worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            due = min(self._retry_at.values(), default=None)
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                model = self._jobs.get(timeout=timeout)
            except queue.Empty:
                self._retry_due()
                continue
            if model is None:
                break
            try:
                self._evaluate(model)
                self._save_sequences()  # nothing to install: recorded now anyway
            except DownloadStoppedError:
                break
            except Exception:
                log.exception("delivery of %s failed unexpectedly", model)

    def _retry_due(self) -> None:
        """Failed downloads get another chance after a backoff (doubling, capped)."""
        now = time.monotonic()
        for key in [k for k, at in self._retry_at.items() if at <= now]:
            del self._retry_at[key]
            self._failed.pop(key, None)
            self._jobs.put(key[0])

    def _target(self, model: str) -> tuple[ReleaseManifest, bool] | None:
        """The release this agent should run now, if any, and whether it is a rollback."""
        installed = self._installed_version(model)
        want = self.desired().get(model)
        with self._lock:
            known = dict(self._releases.get(model, {}))
        if want is not None:
            manifest = known.get(want.version)
            if manifest is None or want.version == installed:
                return None
            if installed is not None and want.version < installed:
                if not want.allow_rollback:
                    if (model, want.version) not in self._rollback_reported:
                        self._rollback_reported.add((model, want.version))
                        self._reject(
                            model,
                            want.version,
                            "rollback",
                            "desired state asks for an older version without allow_rollback",
                        )
                    return None
                return manifest, True
            return manifest, False
        newer = [v for v in known if installed is None or v > installed]
        return (known[max(newer)], False) if newer else None

    def _evaluate(self, model: str) -> None:
        target = self._target(model)
        if target is None:
            return
        manifest, rollback = target
        variant = manifest.variant_for(self._config.device_class)
        assert variant is not None
        key = (model, manifest.version, variant.sha256)
        if key in self._failed:
            return
        try:
            self._install(manifest, rollback)
        except ReleaseRejectedError as exc:
            self._failed[key] = exc.reason
            if exc.reason in _RETRYABLE:
                attempt = self._attempts.get(key, 0)
                self._attempts[key] = attempt + 1
                delay = min(self._config.delivery.retry_after_s * 2**attempt, _MAX_RETRY_S)
                self._retry_at[key] = time.monotonic() + delay
            kind: EventKind = "release_rejected" if exc.reason == "expired" else "install_failed"
            log.warning("install of %s v%d failed: %s", model, manifest.version, exc.message)
            self._telemetry.event(
                kind, model=model, version=manifest.version, reason=exc.reason, detail=exc.message
            )

    def _install(self, manifest: ReleaseManifest, rollback: bool) -> None:
        model, version = manifest.model, manifest.version
        variant = manifest.variant_for(self._config.device_class)
        assert variant is not None
        if manifest.expires_at < self._clock():
            raise ReleaseRejectedError("expired", f"{model} v{version} expired before install")
        path = self._fetch(model, version, variant.sha256, variant.size, variant.chunk_size)
        try:
            loaded = self._load(
                model, version, variant.sha256, path, variant.inputs, variant.outputs
            )
        except InvalidModelError as exc:
            self._store.forget_file(path)
            raise ReleaseRejectedError("load_failed", exc.message) from None
        try:
            self_test(loaded, manifest.example_input)
        except InvalidModelError as exc:
            self._store.forget_file(path)
            raise ReleaseRejectedError("self_test_failed", exc.message) from None
        record = InstalledModel(
            model=model,
            version=version,
            sha256=variant.sha256,
            file=path.name,
            inputs=[s.model_dump() for s in variant.inputs],
            outputs=[s.model_dump() for s in variant.outputs],
        )
        self._save_sequences()
        self._store.commit(record)
        self._activate(loaded)
        self.installs += 1
        self._telemetry.event(
            "rollback" if rollback else "install_succeeded",
            model=model,
            version=version,
            detail=f"sha256 {variant.sha256} ({variant.quantization})",
        )

    def _fetch(self, model: str, version: int, sha256: str, size: int, chunk_size: int) -> Path:
        local = self._store.local_file(model, sha256)
        if local is not None:  # e.g. a rollback to the last good model: no download
            return self._store.place(model, version, sha256, local, move=False)
        part = self._store.partial(sha256, size, chunk_size)
        try:
            # Also when no chunk is missing: an earlier run's unchecked chunks get checked.
            self._fetcher.fetch(part, self._stop)
        except ArtifactError as exc:
            reason = exc.message.split(":", 1)[0]
            if reason == "hash_mismatch":
                part.discard()
            raise ReleaseRejectedError(
                reason if reason in ("hash_mismatch", "download_failed") else "download_failed",
                exc.message,
            ) from None
        finally:
            part.close()
        digest = part.file_sha256()
        if digest != sha256:
            part.discard()
            raise ReleaseRejectedError(
                "hash_mismatch", f"artifact hashes to {digest}, manifest says {sha256}"
            )
        # close() flushed every chunk; commit() syncs the directory after the rename.
        placed = self._store.place(model, version, sha256, part.path, move=True, synced=True)
        with contextlib.suppress(OSError):
            part.discard()
        return placed

    # Kept for the agent's status: versions known per model.
    def known_versions(self, model: str) -> list[int]:
        with self._lock:
            return sorted(self._releases.get(model, {}))

    def fail_reason(self, model: str, version: int) -> str | None:
        return next(
            (r for (m, v, _s), r in self._failed.items() if m == model and v == version), None
        )
