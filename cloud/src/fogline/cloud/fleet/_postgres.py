"""The fleet registry in PostgreSQL, for monitor replicas on several hosts.

psycopg 3 and its pool do the talking. The tables are ``fleet_schema``,
``fleet_devices`` and ``fleet_events`` in the connection's ``search_path``; put them in
a schema of their own with ``?options=-csearch_path%3Dfleet`` in the URL.

Replicas share one database safely: a batch takes a transaction-scoped advisory lock
per device (in one global order, so two batches never deadlock) before it reads and
rewrites those devices, which also covers devices that have no row yet. The offline
sweep skips rows another transaction holds (``FOR UPDATE SKIP LOCKED``): a device
being written is alive. ``psycopg`` errors become :class:`~fogline.protocol.FleetError`
in :meth:`PostgresFleetStore._guard` only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool
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

__all__ = ["PostgresFleetStore", "redact_url"]

SCHEMA_VERSION = 1
# First key of the two-int advisory locks this store takes (b"fogl"), so they cannot
# collide with another application's locks on the same database.
_LOCK_SPACE = 0x666F676C
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS fleet_devices (
        device_id     TEXT PRIMARY KEY,
        status        TEXT NOT NULL,
        last_alive_at DOUBLE PRECISION NOT NULL,
        interval_s    DOUBLE PRECISION,
        record        JSONB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS fleet_devices_by_status ON fleet_devices(status)",
    """CREATE TABLE IF NOT EXISTS fleet_events (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id   TEXT NOT NULL,
        kind        TEXT NOT NULL,
        at          DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        model       TEXT,
        version     INTEGER,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS fleet_events_by_device ON fleet_events(device_id, id)",
)


def redact_url(url: str) -> str:
    """``url`` without its password, for logs, errors and ``--json`` output. Works on the
    text alone, so a URL that does not parse (a bad port, say) is redacted too."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


class PostgresFleetStore(FoldingStore):
    """``PostgresFleetStore("postgresql://user@host/db")`` creates the tables if needed.
    ``readonly=True`` (the CLI) needs them to exist and never writes."""

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        connect_timeout_s: float = 10.0,
        max_connections: int = 4,
    ) -> None:
        self.url = url
        self.location = redact_url(url)
        self.readonly = readonly
        self._current = threading.local()  # the connection of this thread's transaction
        kwargs: dict[str, Any] = {"connect_timeout": max(1, round(connect_timeout_s))}
        # One plain connection first: a wrong password or host is reported as the
        # server said it, where the pool would only time out.
        with self._guard("connect"), psycopg.connect(url, autocommit=True, **kwargs) as conn:
            self._init_schema(conn)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs=kwargs,
            configure=self._configure if readonly else None,
            check=psycopg_pool.ConnectionPool.check_connection,  # survives a server restart
            timeout=connect_timeout_s,
            name="fogline-fleet",
            open=False,
        )
        try:
            with self._guard("connect"):
                self._pool.open(wait=True, timeout=connect_timeout_s)
        except BaseException:
            self._pool.close()  # its workers would go on trying to connect
            raise

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.read_only = True

    def _init_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            exists = conn.execute("SELECT to_regclass('fleet_schema') IS NOT NULL").fetchone()
            if not (exists and exists[0]):
                if self.readonly:
                    raise FleetError(
                        f"no fleet store at {self.location} (has a monitor run against it?)"
                    )
                # Replicas starting together would race on CREATE TABLE IF NOT EXISTS.
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SPACE,))
                for statement in _SCHEMA:
                    conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM fleet_schema").fetchone()
            version = row[0] if row else None
            if version is None:
                if self.readonly:
                    raise FleetError(f"{self.location} is not an initialised fleet store")
                conn.execute("INSERT INTO fleet_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise FleetError(
                    f"fleet store {self.location} has schema version {version}; this "
                    f"Fogline reads up to {SCHEMA_VERSION}"
                )

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """The one place where psycopg and record-parsing errors become FleetError:
        :class:`FleetStoreUnavailableError` for what may pass (the server is down or
        unreachable, a connection was dropped, a deadlock or serialization failure)."""
        try:
            yield
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            transient = isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout)
            error = FleetStoreUnavailableError if transient else FleetError
            raise error(
                f"fleet store {self.location}: {action} failed: {detail.replace(self.url, '')}"
            ) from None
        except ValidationError as exc:
            raise corrupt_record(self.location, action, exc) from None

    # -- reads ---------------------------------------------------------------------------
    def devices(self) -> list[DeviceRecord]:
        with self._guard("list devices"), self._pool.connection() as conn:
            rows = conn.execute(
                'SELECT record FROM fleet_devices ORDER BY device_id COLLATE "C"'
            ).fetchall()
            return [DeviceRecord.model_validate(r[0]) for r in rows]

    def device(self, device_id: str) -> DeviceRecord:
        with self._guard(f"read device {device_id}"), self._pool.connection() as conn:
            row = conn.execute(
                "SELECT record FROM fleet_devices WHERE device_id = %s", (device_id,)
            ).fetchone()
            if row is None:
                raise unknown_device(device_id)
            return DeviceRecord.model_validate(row[0])

    def events(self, device_id: str, limit: int = MAX_EVENTS_PER_DEVICE) -> list[EventRecord]:
        with self._guard(f"read events of {device_id}"), self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM fleet_events "
                "WHERE device_id = %s ORDER BY id DESC LIMIT %s",
                (device_id, limit),
            ).fetchall()
            return [event_from_row(r) for r in rows]

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresFleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- primitives ------------------------------------------------------------------
    @property
    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._current.conn
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self.readonly:
            raise FleetError(f"fleet store {self.location} is open read-only")
        with self._guard("write"), self._pool.connection() as conn, conn.transaction():
            self._current.conn = conn
            try:
                yield
            finally:
                del self._current.conn

    def _lock_devices(self, ids: list[str]) -> None:
        """Take the devices' advisory locks, held until the transaction ends."""
        # OFFSET 0 keeps the subquery's order: every batch locks in the same order.
        self._conn.execute(
            "SELECT pg_advisory_xact_lock(%s, h) FROM (SELECT DISTINCT hashtext(d) AS h "
            "FROM unnest(%s::text[]) AS d ORDER BY h OFFSET 0) AS locks",
            (_LOCK_SPACE, ids),
        )

    def _load(self, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
        ids = sorted(set(device_ids))
        self._lock_devices(ids)
        rows = self._conn.execute(
            "SELECT device_id, record FROM fleet_devices WHERE device_id = ANY(%s) FOR UPDATE",
            (ids,),
        )
        return {d: DeviceRecord.model_validate(r) for d, r in rows}

    def _save(self, records: Iterable[DeviceRecord]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO fleet_devices (device_id, status, last_alive_at, interval_s, record)"
                " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (device_id) DO UPDATE SET "
                "status = excluded.status, last_alive_at = excluded.last_alive_at, "
                "interval_s = excluded.interval_s, record = excluded.record",
                [device_row(r) for r in records],
            )

    def _add_events(self, events: Sequence[EventRecord]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO fleet_events ({', '.join(EVENT_COLUMNS)}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [event_row(e) for e in events],
            )

    def _prune_events(self, device_ids: Iterable[str], keep: int) -> None:
        self._conn.execute(
            "DELETE FROM fleet_events AS e USING ("
            "  SELECT d, (SELECT id FROM fleet_events WHERE device_id = d"
            "             ORDER BY id DESC LIMIT 1 OFFSET %s) AS oldest_kept"
            "  FROM unnest(%s::text[]) AS d) AS k "
            "WHERE e.device_id = k.d AND e.id < k.oldest_kept",
            (keep - 1, sorted(set(device_ids))),
        )

    def _delete(self, device_id: str) -> bool:
        self._lock_devices([device_id])  # a batch writing the device goes first
        self._conn.execute("DELETE FROM fleet_events WHERE device_id = %s", (device_id,))
        gone = self._conn.execute("DELETE FROM fleet_devices WHERE device_id = %s", (device_id,))
        return gone.rowcount > 0

    def _silent(self, sweep: Sweep) -> list[DeviceRecord]:
        rows = self._conn.execute(
            "SELECT record FROM fleet_devices WHERE status = 'online' AND "
            "GREATEST(last_alive_at, %s) + %s * COALESCE(interval_s, %s) < %s "
            "FOR UPDATE SKIP LOCKED",
            (sweep.grace_since, sweep.missed_heartbeats, sweep.default_interval_s, sweep.now),
        ).fetchall()
        return [DeviceRecord.model_validate(r[0]) for r in rows]
