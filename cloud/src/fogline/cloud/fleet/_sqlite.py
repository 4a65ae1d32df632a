"""The fleet registry in one SQLite file (WAL mode), the development default.

WAL lets the CLI read while a monitor writes, from another process. One connection per
store object, guarded by a lock, so the monitor's writer thread, its sweeper and the
metrics server's threads can share it. Records are stored as JSON with the few fields
that queries filter on mirrored in columns. ``sqlite3`` errors become
:class:`~fogline.protocol.FleetError` in :meth:`SqliteFleetStore._guard` only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from fogline.protocol import FleetError, FleetStoreUnavailableError

from ._records import DeviceRecord, EventRecord
from ._store import (
    EVENT_COLUMNS,
    MAX_EVENTS_PER_DEVICE,
    FoldingStore,
    Sweep,
    corrupt_record,
    device_row,
    event_from_row,
    event_row,
    unknown_device,
)

__all__ = ["FLEET_DB_NAME", "SqliteFleetStore"]

FLEET_DB_NAME = "fleet.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id     TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    last_alive_at REAL NOT NULL,
    interval_s    REAL,
    record        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_status ON devices(status);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    at          REAL NOT NULL,
    received_at REAL NOT NULL,
    model       TEXT,
    version     INTEGER,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_device ON events(device_id, id);
"""
_CHUNK = 500  # stay far below SQLite's bound-parameter limit


class SqliteFleetStore(FoldingStore):
    """``SqliteFleetStore(path)`` creates the file (and its folder) if needed.
    ``readonly=True`` opens an existing file for reading only (the CLI)."""

    def __init__(
        self, path: Path | str, *, readonly: bool = False, timeout_s: float = 30.0
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.readonly = readonly
        self._lock = threading.RLock()
        with self._guard("open"):
            if readonly:
                if not self.path.is_file():
                    raise FleetError(f"no fleet store at {self.path} (has a monitor run here?)")
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(
                    uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
                )
            self._init_schema()

    def _init_schema(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise FleetError(
                f"fleet store {self.path} has schema version {version}; this Fogline reads "
                f"up to {SCHEMA_VERSION}"
            )
        if self.readonly:
            if version < SCHEMA_VERSION:
                raise FleetError(f"{self.path} is not an initialised fleet store")
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only an OS crash may
        # lose the last commits, which the next heartbeats repair anyway.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """The one place where sqlite3 and record-parsing errors become FleetError
        (:class:`FleetStoreUnavailableError` for a database locked past the timeout)."""
        try:
            yield
        except sqlite3.Error as exc:
            locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            error = FleetStoreUnavailableError if locked else FleetError
            raise error(f"fleet store {self.path}: {action} failed: {exc}") from None
        except ValidationError as exc:
            raise corrupt_record(str(self.path), action, exc) from None

    # -- reads ---------------------------------------------------------------------------
    def devices(self) -> list[DeviceRecord]:
        with self._lock, self._guard("list devices"):
            rows = self._db.execute("SELECT record FROM devices ORDER BY device_id").fetchall()
            return [DeviceRecord.model_validate_json(r[0]) for r in rows]

    def device(self, device_id: str) -> DeviceRecord:
        with self._lock, self._guard(f"read device {device_id}"):
            row = self._db.execute(
                "SELECT record FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                raise unknown_device(device_id)
            return DeviceRecord.model_validate_json(row[0])

    def events(self, device_id: str, limit: int = MAX_EVENTS_PER_DEVICE) -> list[EventRecord]:
        with self._lock, self._guard(f"read events of {device_id}"):
            rows = self._db.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} "
                "FROM events WHERE device_id = ? ORDER BY id DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
            return [event_from_row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteFleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- primitives ------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self.readonly:
            raise FleetError(f"fleet store {self.path} is open read-only")
        with self._lock, self._guard("write"):
            # IMMEDIATE takes the write lock up front, so two replicas never deadlock
            # upgrading a read to a write.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        ids = list(device_ids)
        out: dict[str, DeviceRecord] = {}
        for i in range(0, len(ids), _CHUNK):
            part = ids[i : i + _CHUNK]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT device_id, record FROM devices WHERE device_id IN ({marks})", part
            )
            out.update((d, DeviceRecord.model_validate_json(r)) for d, r in rows)
        return out

    def _save(self, records: Iterable[DeviceRecord]) -> None:
        self._db.executemany(
            "INSERT INTO devices (device_id, status, last_alive_at, interval_s, record) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
            "status = excluded.status, last_alive_at = excluded.last_alive_at, "
            "interval_s = excluded.interval_s, record = excluded.record",
            [device_row(r) for r in records],
        )

    def _add_events(self, events: Sequence[EventRecord]) -> None:
        self._db.executemany(
            f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [event_row(e) for e in events],
        )

    def _prune_events(self, device_ids: Iterable[str], keep: int) -> None:
        self._db.executemany(
            "DELETE FROM events WHERE device_id = ? AND id < COALESCE(("
            "SELECT id FROM events WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?), 0)",
            [(d, d, keep - 1) for d in device_ids],
        )

    def _delete(self, device_id: str) -> bool:
        self._db.execute("DELETE FROM events WHERE device_id = ?", (device_id,))
        return (
            self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0
        )

    def _silent(self, sweep: Sweep) -> list[DeviceRecord]:
        rows = self._db.execute(
            "SELECT record FROM devices WHERE status = 'online' AND "
            "MAX(last_alive_at, ?) + ? * COALESCE(interval_s, ?) < ?",
            (sweep.grace_since, sweep.missed_heartbeats, sweep.default_interval_s, sweep.now),
        ).fetchall()
        return [DeviceRecord.model_validate_json(r[0]) for r in rows]
