"""The fleet store interface, and the one place where batches are folded into records.

:class:`FleetStore` is what the monitor, the summary, the metrics and the CLI use.
:class:`FoldingStore` implements :meth:`FleetStore.apply` and :meth:`FleetStore.sweep`
once, on top of a few primitives (load, save, events) that each database provides
inside one transaction. Read-modify-write happens inside that transaction, so several
monitor replicas may share one database: a device's heartbeats can reach different
replicas (shared subscriptions hand out messages, not devices) and the counter deltas
still come out right.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from fogline.protocol import DeviceEvent, DeviceState, FleetError, Heartbeat, UnknownDeviceError

from ._records import (
    DeviceRecord,
    EventRecord,
    apply_event,
    apply_heartbeat,
    apply_state,
    mark_offline,
)

__all__ = [
    "EVENT_COLUMNS",
    "MAX_EVENTS_PER_DEVICE",
    "FleetStore",
    "FoldingStore",
    "Observed",
    "Sweep",
    "corrupt_record",
    "device_row",
    "event_from_row",
    "event_row",
    "unknown_device",
]

MAX_EVENTS_PER_DEVICE = 50
# The columns of a stored event, in the order of event_row (the same in every database).
EVENT_COLUMNS = ("device_id", "kind", "at", "received_at", "model", "version", "reason", "detail")


def device_row(record: DeviceRecord) -> tuple[str, str, float, float | None, str]:
    """A device as stored: the columns queries filter on, then the whole record as JSON."""
    return (
        record.device_id,
        record.status,
        record.last_alive_at,
        record.interval_s,
        record.model_dump_json(),
    )


def event_row(event: EventRecord) -> tuple[object, ...]:
    return tuple(getattr(event, column) for column in EVENT_COLUMNS)


def unknown_device(device_id: str) -> UnknownDeviceError:
    return UnknownDeviceError(f"no device {device_id!r} in the fleet registry")


def corrupt_record(location: str, action: str, exc: ValidationError) -> FleetError:
    """What a store reports for a stored record that no longer parses."""
    return FleetError(
        f"fleet store {location}: {action}: a stored record is corrupt: {exc.errors()[0]['msg']}"
    )


def event_from_row(row: Sequence[object]) -> EventRecord:
    """The inverse of :func:`event_row`, for a row selected as ``EVENT_COLUMNS``."""
    return EventRecord.model_validate(dict(zip(EVENT_COLUMNS, row, strict=True)))


@dataclass(frozen=True, slots=True)
class Observed:
    """One valid message as the monitor received it."""

    message: DeviceState | Heartbeat | DeviceEvent
    received_at: float


@dataclass(frozen=True, slots=True)
class Sweep:
    """Mark offline every online device silent for ``missed_heartbeats`` intervals.

    Silence is counted from ``max(last_alive_at, grace_since)``: a monitor that was
    down does not declare the whole fleet dead the moment it comes back.
    """

    now: float
    grace_since: float
    missed_heartbeats: int
    default_interval_s: float


@runtime_checkable
class FleetStore(Protocol):
    """The device registry. Implementations are safe to call from several threads."""

    location: str

    def apply(self, batch: Sequence[Observed]) -> int:
        """Fold a batch of received messages into the registry in one transaction.
        Returns how many messages were applied."""
        ...

    def sweep(self, sweep: Sweep) -> list[str]:
        """Mark silent devices offline; returns their ids."""
        ...

    def devices(self) -> list[DeviceRecord]: ...

    def device(self, device_id: str) -> DeviceRecord:
        """Raises :class:`~fogline.protocol.UnknownDeviceError` if there is no such device."""
        ...

    def events(self, device_id: str, limit: int = MAX_EVENTS_PER_DEVICE) -> list[EventRecord]:
        """The device's most recent events, newest first."""
        ...

    def forget(self, device_id: str) -> None:
        """Remove a device and its events (a decommissioned device). Raises
        :class:`~fogline.protocol.UnknownDeviceError` if there is no such device."""
        ...

    def close(self) -> None: ...


class FoldingStore(ABC):
    """Shared logic over per-database primitives. Subclasses open a transaction in
    :meth:`_transaction` and implement the primitives against it."""

    location: str
    max_events: int = MAX_EVENTS_PER_DEVICE

    def apply(self, batch: Sequence[Observed]) -> int:
        if not batch:
            return 0
        ids = {item.message.device_id for item in batch}
        with self._transaction():
            records: dict[str, DeviceRecord] = self._load(ids)
            events: list[EventRecord] = []
            for item in batch:
                msg, at = item.message, item.received_at
                current = records.get(msg.device_id)
                if isinstance(msg, Heartbeat):
                    records[msg.device_id] = apply_heartbeat(current, msg, at)
                elif isinstance(msg, DeviceState):
                    records[msg.device_id] = apply_state(current, msg, at)
                else:
                    records[msg.device_id] = apply_event(current, msg, at)
                    events.append(EventRecord.from_event(msg, at))
            self._save(records.values())
            if events:
                self._add_events(events)
                self._prune_events({e.device_id for e in events}, self.max_events)
        return len(batch)

    def sweep(self, sweep: Sweep) -> list[str]:
        with self._transaction():
            silent = self._silent(sweep)
            if not silent:
                return []
            changed = [mark_offline(r, "missed_heartbeats", sweep.now) for r in silent]
            self._save(changed)
        return [r.device_id for r in changed]

    def forget(self, device_id: str) -> None:
        with self._transaction():
            if not self._delete(device_id):
                raise unknown_device(device_id)

    # -- primitives (called inside _transaction) ---------------------------------------
    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]: ...

    @abstractmethod
    def _load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]: ...

    @abstractmethod
    def _save(self, records: Iterable[DeviceRecord]) -> None: ...

    @abstractmethod
    def _add_events(self, events: Sequence[EventRecord]) -> None: ...

    @abstractmethod
    def _prune_events(self, device_ids: Iterable[str], keep: int) -> None: ...

    @abstractmethod
    def _delete(self, device_id: str) -> bool:
        """Delete the device and its events; False if it was not there."""

    @abstractmethod
    def _silent(self, sweep: Sweep) -> list[DeviceRecord]:
        """Online devices whose heartbeat deadline has passed."""
