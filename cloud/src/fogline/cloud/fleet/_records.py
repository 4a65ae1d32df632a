"""What the fleet registry keeps per device, and the pure functions that update it.

A :class:`DeviceRecord` is folded from the messages a device sends: every function here
takes the current record (or ``None`` for a new device) and returns a new one. Stores
persist records; they never compute them. That keeps the arithmetic (counter deltas,
agent restarts, online/offline transitions) in one place, unit-testable, and identical
for SQLite and PostgreSQL.

Times named ``*_at``/``*_seen``/``*_since`` are the *monitor's* clock at receipt, never
the device's: offline detection must not depend on device clocks being right.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fogline.protocol import DeviceEvent, DeviceState, EventKind, Heartbeat

__all__ = [
    "DeviceRecord",
    "DeviceStatus",
    "EventRecord",
    "OfflineReason",
    "RecentWindow",
    "Totals",
    "apply_event",
    "apply_heartbeat",
    "apply_state",
    "mark_offline",
]

DeviceStatus = Literal["online", "offline"]
# "last_will": a retained offline DeviceState. The agent's last will and its clean
# goodbye are the same message, so both land here.
OfflineReason = Literal["last_will", "missed_heartbeats"]
OnlineReason = Literal["online_state", "heartbeat", "event"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Totals(_Model):
    """Counters summed over every agent session, so they never go backwards even when
    an agent restarts and its own cumulative counters start again from zero."""

    requests: int = 0
    errors: int = 0
    edge_requests: int = 0
    cloud_requests: int = 0
    budgeted_requests: int = 0
    met_budget: int = 0
    telemetry_dropped: int = 0


class RecentWindow(_Model):
    """Counter deltas between a device's last two heartbeats (its recent activity)."""

    seconds: float = Field(ge=0)
    requests: int = 0
    errors: int = 0
    telemetry_dropped: int = 0

    @property
    def request_rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class DeviceRecord(_Model):
    device_id: str
    device_class: str | None = None
    groups: list[str] = []
    agent_version: str = ""
    first_seen: float
    last_seen: float
    status: DeviceStatus = "online"
    status_reason: str = "online_state"
    status_since: float
    # Receipt time of the last sign of life that counts for offline detection
    # (a heartbeat or an online state).
    last_alive_at: float
    heartbeat: Heartbeat | None = None
    heartbeats: int = 0
    totals: Totals = Totals()
    recent: RecentWindow | None = None

    @property
    def online(self) -> bool:
        return self.status == "online"

    @property
    def interval_s(self) -> float | None:
        return self.heartbeat.interval_s if self.heartbeat is not None else None


class EventRecord(_Model):
    device_id: str
    kind: EventKind
    at: float
    received_at: float
    model: str | None = None
    version: int | None = None
    reason: str = ""
    detail: str = ""

    @classmethod
    def from_event(cls, event: DeviceEvent, received_at: float) -> EventRecord:
        return cls(
            device_id=event.device_id,
            kind=event.kind,
            at=event.at,
            received_at=received_at,
            model=event.model,
            version=event.version,
            reason=event.reason,
            detail=event.detail,
        )


def _new(device_id: str, at: float) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id, first_seen=at, last_seen=at, status_since=at, last_alive_at=at
    )


def _online(record: DeviceRecord, reason: OnlineReason, at: float) -> dict[str, object]:
    """Fields for a sign of life: flips an offline device back online."""
    changes: dict[str, object] = {"last_seen": max(record.last_seen, at)}
    if record.status != "online":
        changes.update(status="online", status_reason=reason, status_since=at)
    return changes


_COUNTERS = (
    "requests",
    "errors",
    "edge_requests",
    "cloud_requests",
    "budgeted_requests",
    "met_budget",
    "telemetry_dropped",
)


def apply_heartbeat(record: DeviceRecord | None, hb: Heartbeat, received_at: float) -> DeviceRecord:
    """Fold one heartbeat in: latest figures, monotonic totals, the recent window."""
    record = record or _new(hb.device_id, received_at)
    prev = record.heartbeat
    alive = {**_online(record, "heartbeat", received_at), "last_alive_at": received_at}
    if prev is not None and hb.uptime_s == prev.uptime_s and hb.seq == prev.seq:
        # A QoS 1 redelivery: a sign of life, but nothing to count twice.
        return record.model_copy(update=alive)
    if prev is not None and hb.at < prev.at:
        # Older than the one we hold (replicas behind a shared subscription may apply a
        # device's heartbeats out of order). Its counters are already included in the
        # newer cumulative ones, so only the sign of life counts.
        return record.model_copy(update={**alive, "heartbeats": record.heartbeats + 1})
    restarted = (
        prev is None
        or hb.uptime_s < prev.uptime_s
        or any(getattr(hb, c) < getattr(prev, c) for c in _COUNTERS)
    )
    if restarted:
        # Counters are cumulative since the agent (re)started: all of them are new.
        deltas = {c: getattr(hb, c) for c in _COUNTERS}
        seconds = hb.uptime_s
    else:
        assert prev is not None
        deltas = {c: getattr(hb, c) - getattr(prev, c) for c in _COUNTERS}
        seconds = hb.uptime_s - prev.uptime_s
    totals = Totals(**{c: getattr(record.totals, c) + deltas[c] for c in _COUNTERS})
    recent = RecentWindow(
        seconds=max(seconds, 0.0),
        requests=deltas["requests"],
        errors=deltas["errors"],
        telemetry_dropped=deltas["telemetry_dropped"],
    )
    return record.model_copy(
        update={
            **_online(record, "heartbeat", received_at),
            "device_class": hb.device_class,
            "groups": list(hb.groups),
            "last_alive_at": received_at,
            "heartbeat": hb,
            "heartbeats": record.heartbeats + 1,
            "totals": totals,
            "recent": recent,
        }
    )


def apply_state(
    record: DeviceRecord | None, state: DeviceState, received_at: float
) -> DeviceRecord:
    """Fold a retained online/offline state (offline is the last will)."""
    record = record or _new(state.device_id, received_at)
    changes: dict[str, object] = {"last_seen": max(record.last_seen, received_at)}
    if state.device_class is not None:
        changes["device_class"] = state.device_class
    if state.groups:
        changes["groups"] = list(state.groups)
    if state.agent_version:
        changes["agent_version"] = state.agent_version
    if state.status == "online":
        changes.update(_online(record, "online_state", received_at))
        changes["last_alive_at"] = received_at
    elif record.status != "offline":
        changes.update(status="offline", status_reason="last_will", status_since=received_at)
    return record.model_copy(update=changes)


def apply_event(
    record: DeviceRecord | None, event: DeviceEvent, received_at: float
) -> DeviceRecord:
    """An event is a sign of activity (last seen) but not of liveness: ``agent_stopping``
    must not flip a device online, and heartbeats alone drive offline detection."""
    record = record or _new(event.device_id, received_at)
    return record.model_copy(update={"last_seen": max(record.last_seen, received_at)})


def mark_offline(record: DeviceRecord, reason: OfflineReason, at: float) -> DeviceRecord:
    if record.status == "offline":
        return record
    return record.model_copy(
        update={"status": "offline", "status_reason": reason, "status_since": at}
    )
