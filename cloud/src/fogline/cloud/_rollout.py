"""Following a rollout: which devices in a scope run a published version yet.

:class:`RolloutTracker` is the logic, with no broker: it is fed the fleet's own messages
(retained device state, heartbeats, install events, and the retained desired states of
groups and devices) and says, per device in the scope, where the rollout stands.
:class:`RolloutWatch` feeds it from a transport and waits for the outcome.

Outcomes, per device the scope covers:

- ``updated``: it reported running the version (an install event, or a heartbeat);
- ``failed``: it reported that the install failed or that it rejected the release (a
  later success still turns it ``updated``: agents retry failed downloads);
- ``pending``: online, and neither yet;
- ``offline``: known to the broker as offline; it updates when it returns, the rollout
  does not wait for it (as Mender and Greengrass leave offline devices pending);
- ``held``: a desired state of higher precedence (device over group over fleet, first
  group first, as the agent merges them) names another version of the model;
- ``no_variant``: the release has no variant for its device class; the cloud serves it.

A rollout ends when no device is pending: *complete* if none failed (or no more than
``max_failures``, when that is given), else *failed*. It is *aborted* as soon as more
than ``max_failures`` devices failed, pending ones or not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fogline.protocol import (
    DecodeError,
    DeviceEvent,
    DeviceState,
    FoglineError,
    Heartbeat,
    Message,
    MqttMessage,
    MqttTransport,
    SignedDesiredState,
    Topics,
    TrustStore,
    decode,
    verify_desired,
)

from ._manifest import Scope, format_scope

__all__ = ["DeviceRollout", "Outcome", "RolloutStatus", "RolloutTracker", "RolloutWatch"]

log = logging.getLogger("fogline.cloud.rollout")

Outcome = Literal["updated", "failed", "pending", "offline", "held", "no_variant"]
OUTCOMES: tuple[Outcome, ...] = ("updated", "failed", "pending", "offline", "held", "no_variant")
Result = Literal["complete", "failed", "aborted", "timed_out", "in_progress"]

_REPORTS: dict[str, type[Message]] = {
    "device_state": DeviceState,
    "heartbeat": Heartbeat,
    "events": DeviceEvent,
}
_SUCCESS = ("install_succeeded", "rollback")  # "rollback" is a rollback's install succeeding
_FAILURE = ("install_failed", "release_rejected")


@dataclass
class _Device:
    device_id: str
    device_class: str | None = None
    groups: tuple[str, ...] = ()
    online: bool = True
    running: int | None = None
    failure: str = ""  # reason of the last failure for the target version
    updated_at: float | None = None


@dataclass(frozen=True)
class DeviceRollout:
    device_id: str
    device_class: str | None
    groups: tuple[str, ...]
    online: bool
    running: int | None
    outcome: Outcome
    reason: str = ""
    updated_s: float | None = None  # since the rollout started

    def summary(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_class": self.device_class,
            "groups": list(self.groups),
            "online": self.online,
            "running": self.running,
            "outcome": self.outcome,
            "reason": self.reason,
            "updated_s": self.updated_s,
        }


@dataclass(frozen=True)
class RolloutStatus:
    model: str
    version: int
    scope: str
    elapsed_s: float
    devices: list[DeviceRollout]
    result: Result = "in_progress"
    ignored_messages: int = 0
    counts: dict[Outcome, int] = field(init=False)

    def __post_init__(self) -> None:
        tally = Counter(d.outcome for d in self.devices)
        object.__setattr__(self, "counts", {o: tally.get(o, 0) for o in OUTCOMES})

    @property
    def target(self) -> int:
        """Devices this rollout waits for: updated, failed or pending."""
        return self.counts["updated"] + self.counts["failed"] + self.counts["pending"]

    @property
    def settled(self) -> bool:
        return self.counts["pending"] == 0

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "scope": self.scope,
            "result": self.result,
            "elapsed_s": round(self.elapsed_s, 3),
            "target": self.target,
            "counts": dict(self.counts),
            "ignored_messages": self.ignored_messages,
            "devices": [d.summary() for d in self.devices],
        }


class RolloutTracker:
    """Where ``model:version``'s rollout to ``scope`` stands, from the fleet's messages.

    ``variant_classes`` are the device classes the release has a variant for. With
    ``trust``, desired states whose signature does not verify are ignored (the agents
    ignore them too). Thread-safe: :meth:`handle` runs on a network thread."""

    def __init__(
        self,
        model: str,
        version: int,
        scope: Scope,
        variant_classes: Iterable[str],
        *,
        topics: Topics | None = None,
        trust: TrustStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.version = version
        self.scope = scope
        self.variant_classes = frozenset(variant_classes)
        self.topics = topics or Topics()
        self._trust = trust
        self._clock = clock
        self._started = clock()
        self._devices: dict[str, _Device] = {}
        self._groups_want: dict[str, int] = {}  # group -> version its desired state names
        self._devices_want: dict[str, int] = {}
        self._ignored = 0
        self._lock = threading.Lock()

    def restart_clock(self) -> None:
        """Count ``updated_s`` and ``elapsed_s`` from now (the publish), not from creation."""
        with self._lock:
            self._started = self._clock()

    # -- input -------------------------------------------------------------------------
    def handle(self, msg: MqttMessage) -> None:
        """Take one message from any of :meth:`topic_filters`; anything that does not
        parse or decode is counted and ignored."""
        try:
            parsed = self.topics.parse(msg.topic)
            with self._lock:
                if parsed.kind == "group_desired":
                    assert parsed.group is not None
                    self._want(self._groups_want, parsed.group, msg.payload)
                elif parsed.kind == "device_desired":
                    assert parsed.device_id is not None
                    self._want(self._devices_want, parsed.device_id, msg.payload)
                elif parsed.kind in _REPORTS and msg.payload:
                    report = decode(msg.payload, _REPORTS[parsed.kind])
                    if report.device_id != parsed.device_id:  # type: ignore[attr-defined]
                        raise DecodeError(f"{msg.topic}: a message of another device")
                    if isinstance(report, DeviceState):
                        self._state(report)
                    elif isinstance(report, Heartbeat):
                        self._heartbeat(report)
                    elif isinstance(report, DeviceEvent):
                        self._event(report)
        except FoglineError as exc:  # DecodeError, TopicError, SignatureError
            with self._lock:
                self._ignored += 1
            log.debug("rollout: ignored a message on %s: %s", msg.topic, exc)

    def topic_filters(self) -> list[str]:
        t = self.topics
        return [
            t.all_group_desired(),
            t.all_device("desired"),
            t.all_device("state"),
            t.all_device("heartbeat"),
            t.all_device("events"),
        ]

    def _want(self, table: dict[str, int], key: str, payload: bytes) -> None:
        if not payload:  # a cleared retained desired state
            table.pop(key, None)
            return
        signed = decode(payload, SignedDesiredState)
        desired = verify_desired(signed, self._trust) if self._trust else signed.desired
        entry = desired.models.get(self.model)
        if entry is None:
            table.pop(key, None)
        else:
            table[key] = entry.version

    def _device(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = _Device(device_id)
        return device

    def _state(self, state: DeviceState) -> None:
        device = self._device(state.device_id)
        device.online = state.status == "online"
        if state.device_class is not None:
            device.device_class = state.device_class
        if state.groups:
            device.groups = tuple(state.groups)

    def _heartbeat(self, hb: Heartbeat) -> None:
        device = self._device(hb.device_id)
        device.online = True
        device.device_class = hb.device_class
        device.groups = tuple(hb.groups)
        self._running(device, hb.models.get(self.model))

    def _event(self, event: DeviceEvent) -> None:
        if event.model != self.model or event.version is None:
            return
        device = self._device(event.device_id)
        if event.kind in _SUCCESS:
            self._running(device, event.version)
        elif event.kind in _FAILURE and event.version == self.version:
            device.failure = event.reason or event.kind

    def _running(self, device: _Device, version: int | None) -> None:
        device.running = version
        if version == self.version and device.updated_at is None:
            device.updated_at = self._clock() - self._started
            device.failure = ""

    # -- output ------------------------------------------------------------------------
    def status(self, result: Result = "in_progress") -> RolloutStatus:
        with self._lock:
            devices = [
                d
                for d in (self._classify(dev) for dev in sorted(self._devices.values(), key=_id))
                if d is not None
            ]
            return RolloutStatus(
                model=self.model,
                version=self.version,
                scope=format_scope(self.scope),
                elapsed_s=self._clock() - self._started,
                devices=devices,
                result=result,
                ignored_messages=self._ignored,
            )

    def _classify(self, d: _Device) -> DeviceRollout | None:
        kind, target = self.scope
        if kind == "group" and target not in d.groups:
            return None
        if kind == "device" and d.device_id != target:
            return None

        def out(outcome: Outcome, reason: str = "") -> DeviceRollout:
            updated = d.updated_at if outcome == "updated" else None
            return DeviceRollout(
                d.device_id, d.device_class, d.groups, d.online, d.running, outcome, reason, updated
            )

        if d.device_class is not None and d.device_class not in self.variant_classes:
            return out("no_variant", f"no variant for {d.device_class}")
        held = self._held_by(d)
        if held is not None:
            return out("held", held)
        if d.running == self.version:
            return out("updated")
        if not d.online:
            return out("offline")
        if d.failure:
            return out("failed", d.failure)
        return out("pending")

    def _held_by(self, d: _Device) -> str | None:
        """The scope of higher precedence that names another version, if any."""
        kind, target = self.scope
        candidates: list[tuple[str, int | None]] = []
        if kind != "device":
            candidates.append((f"device:{d.device_id}", self._devices_want.get(d.device_id)))
        if kind == "fleet":
            candidates += [(f"group:{g}", self._groups_want.get(g)) for g in d.groups]
        elif kind == "group":
            # groups before ours in the device's list take precedence over ours
            for g in d.groups[: d.groups.index(target)] if target in d.groups else ():
                candidates.append((f"group:{g}", self._groups_want.get(g)))
        for scope, version in candidates:
            if version is not None:
                return None if version == self.version else f"{scope} wants v{version}"
        return None


def _id(device: _Device) -> str:
    return device.device_id


class RolloutWatch:
    """Subscribes a tracker to the fleet's messages for as long as the context lasts."""

    def __init__(self, transport: MqttTransport, tracker: RolloutTracker) -> None:
        self.transport = transport
        self.tracker = tracker
        self._filters: list[str] = []
        self._changed = threading.Event()

    def __enter__(self) -> RolloutWatch:
        """Subscribe (waiting for the broker's acknowledgements), then give the retained
        device states and desired states a moment to arrive."""
        try:
            for topic_filter in self.tracker.topic_filters():
                self.transport.subscribe(topic_filter, self._on_message, qos=1, wait=True)
                self._filters.append(topic_filter)
        except BaseException:
            self._unsubscribe()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        for topic_filter in self._filters:
            try:
                self.transport.unsubscribe(topic_filter)
            except FoglineError as exc:
                log.debug("rollout: unsubscribe %s: %s", topic_filter, exc)
        self._filters.clear()

    def _on_message(self, msg: MqttMessage) -> None:
        self.tracker.handle(msg)
        self._changed.set()

    def settle(self, quiet_s: float = 0.3, max_s: float = 3.0) -> None:
        """Wait until no message came for ``quiet_s`` (the retained ones are in)."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            self._changed.clear()
            if not self._changed.wait(quiet_s):
                return

    def wait(
        self,
        timeout_s: float,
        *,
        max_failures: int | None = None,
        on_change: Callable[[RolloutStatus], None] | None = None,
        poll_s: float = 0.1,
    ) -> RolloutStatus:
        """Block until no device is pending (``complete`` or ``failed``), more than
        ``max_failures`` failed (``aborted``) or ``timeout_s`` passed (``timed_out``);
        ``on_change`` sees each new status (for a progress bar)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.tracker.status()
            if on_change is not None:
                on_change(status)
            if max_failures is not None and status.counts["failed"] > max_failures:
                return self.tracker.status("aborted")
            if status.settled:
                failed = status.counts["failed"] and max_failures is None
                return self.tracker.status("failed" if failed else "complete")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.tracker.status("timed_out")
            self._changed.wait(min(poll_s, remaining))
            self._changed.clear()
