"""Telemetry: retained online state with an offline last will, heartbeats and events.

Heartbeats and events go through an outbox: sent at once while connected, otherwise
kept in a bounded SQLite queue under the data directory and flushed, in order, after the
next connect. Beyond the bound the oldest rows are dropped; drops are counted (and the
count survives restarts) and reported in the next heartbeat as ``telemetry_dropped``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fogline.protocol import (
    DeviceEvent,
    DeviceState,
    EventKind,
    FoglineError,
    Heartbeat,
    Message,
    MqttTransport,
    Topics,
    Will,
    encode,
)

__all__ = ["Outbox", "Telemetry", "offline_will"]

log = logging.getLogger("fogline.edge.telemetry")

AGENT_VERSION = "0.1.0"
_FLUSH_ACK_TIMEOUT_S = 5.0
_STOP_FLUSH_S = 2.0


def offline_will(
    topics: Topics,
    device_id: str,
    device_class: str,
    groups: list[str],
    at: float,
    *,
    key_set_version: int | None = None,
) -> Will:
    """The last will: a retained ``offline`` state the broker publishes if we die. It is
    fixed at connect, so its ``key_set_version`` may lag a rotation adopted since."""
    state = DeviceState(
        device_id=device_id,
        status="offline",
        at=at,
        device_class=device_class,
        groups=groups,
        agent_version=AGENT_VERSION,
        key_set_version=key_set_version,
    )
    return Will(topic=topics.device_state(device_id), payload=encode(state), qos=1, retain=True)


class Outbox:
    """A bounded FIFO of (topic, payload) on disk."""

    def __init__(self, path: Path, bound: int) -> None:
        self.bound = bound
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " topic TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0
        # Rows kept, counted here (this object is the table's only writer): every event
        # asks whether older rows wait, and a COUNT(*) each time cost SQLite's file
        # checks, a lock and an unlock, each a system call letting the GIL go.
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def put(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if self.bound == 0:
                self._count_drop(1)
                return
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload)
                )
                count = self._count + 1
                excess = count - self.bound
                if excess > 0:  # keep the freshest: drop the oldest, and say so
                    deleted = self._db.execute(
                        "DELETE FROM outbox WHERE id IN "
                        "(SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (excess,),
                    ).rowcount
                    count -= deleted
                    self._count_drop(deleted)
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._count = count

    def _count_drop(self, n: int) -> None:
        self.dropped += n
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('dropped', ?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (self.dropped,),
        )

    def peek(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(int(i), str(t), bytes(p)) for i, t, p in rows]

    def remove(self, row_id: int) -> None:
        with self._lock:
            deleted = self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,)).rowcount
            self._count -= max(deleted, 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Telemetry:
    """Publishes state, heartbeats and events for one agent, from its own thread."""

    def __init__(
        self,
        *,
        transport: MqttTransport,
        topics: Topics,
        device_id: str,
        device_class: str,
        groups: list[str],
        interval_s: float,
        outbox: Outbox,
        heartbeat: Callable[[int], Heartbeat],
        clock: Callable[[], float] = time.time,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._topics = topics
        self.device_id = device_id
        self._device_class = device_class
        self._groups = groups
        self.interval_s = interval_s
        self.outbox = outbox
        self._heartbeat = heartbeat
        self._clock = clock
        self._on_tick = on_tick
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connect_pending = False
        self._state_changed = False  # cleared before the state is built: no change is lost
        self._seq = 0
        self._thread: threading.Thread | None = None
        # The agent may hold back repeats (e.g. ``wrong_device_class`` for a model it
        # serves through the cloud): called with each event, False drops it.
        self.event_filter: Callable[[DeviceEvent], bool] | None = None
        self.key_set_version: int | None = None  # reported in the retained state
        transport.add_connection_listener(self._on_connection)

    # -- public ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"telemetry-{self.device_id}", daemon=True
        )
        self._thread.start()
        if self._transport.connected:
            self._on_connection(True)

    def stop(self, *, publish_offline: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._transport.connected:
            # What is queued (e.g. the stop event, queued behind a flush in progress)
            # goes out now, briefly; whatever cannot stays on disk for the next start.
            try:
                self._flush(time.monotonic() + _STOP_FLUSH_S)
            except FoglineError as exc:
                log.warning("telemetry left queued on disk at stop: %s", exc)
        if publish_offline and self._transport.connected:
            try:
                self._transport.publish(
                    self._topics.device_state(self.device_id),
                    encode(self._state("offline")),
                    qos=1,
                    retain=True,
                    wait=True,
                    timeout=2.0,
                )
            except FoglineError as exc:
                log.warning("could not publish the offline state: %s", exc)

    @property
    def dropped(self) -> int:
        return self.outbox.dropped

    def event(
        self,
        kind: EventKind,
        *,
        model: str | None = None,
        version: int | None = None,
        reason: str = "",
        detail: str = "",
    ) -> None:
        """Publish a :class:`DeviceEvent` (kept on disk while offline)."""
        msg = DeviceEvent(
            device_id=self.device_id,
            kind=kind,
            at=self._clock(),
            model=model,
            version=version,
            reason=reason,
            detail=detail[:2048],
        )
        if self.event_filter is not None and not self.event_filter(msg):
            log.debug("event %s %s v%s %s held back (repeat)", kind, model, version, reason)
            return
        log.info("event %s model=%s version=%s reason=%s %s", kind, model, version, reason, detail)
        self.send(self._topics.events(self.device_id), msg)

    def send(self, topic: str, message: Message) -> None:
        """Publish now if connected and nothing older waits; else queue on disk."""
        payload = encode(message)
        with self._send_lock:
            if self._transport.connected and not self._connect_pending and len(self.outbox) == 0:
                try:
                    self._transport.publish(topic, payload, qos=1)
                    return
                except FoglineError:
                    pass
            self.outbox.put(topic, payload)
            if self._transport.connected:  # queued behind older rows: flush soon
                self._connect_pending = True
                self._wake.set()

    def announce(self) -> None:
        """Publish the retained online state again soon (it changed: a key rotation)."""
        self._state_changed = True
        self._wake.set()

    def heartbeat_now(self) -> Heartbeat:
        """Build and send one heartbeat (the thread does this every interval)."""
        hb = self._heartbeat(self._seq)
        self._seq += 1
        self.send(self._topics.heartbeat(self.device_id), hb)
        return hb

    # -- internals ---------------------------------------------------------------------------
    def _state(self, status: str) -> DeviceState:
        return DeviceState(
            device_id=self.device_id,
            status=status,  # type: ignore[arg-type]
            at=self._clock(),
            device_class=self._device_class,
            groups=self._groups,
            agent_version=AGENT_VERSION,
            key_set_version=self.key_set_version,
        )

    def _on_connection(self, up: bool) -> None:
        # Network thread: only flag and wake; the telemetry thread does the publishing.
        if up:
            self._connect_pending = True
            self._wake.set()

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            if self._connect_pending and self._transport.connected:
                self._announce_and_flush()
            elif self._state_changed and self._transport.connected:
                self._announce_state()
            now = time.monotonic()
            if now >= next_beat:
                try:
                    self.heartbeat_now()
                    if self._on_tick is not None:
                        self._on_tick()
                except Exception:
                    log.exception("heartbeat failed")
                next_beat = now + self.interval_s
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()

    def _flush(self, deadline: float | None) -> None:
        """Send queued rows in order, each acknowledged before it leaves the disk."""
        while deadline is not None or not self._stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return
            rows = self.outbox.peek()
            if not rows:
                return
            for row_id, topic, payload in rows:
                self._transport.publish(
                    topic, payload, qos=1, wait=True, timeout=_FLUSH_ACK_TIMEOUT_S
                )
                self.outbox.remove(row_id)

    def _publish_online(self) -> None:
        self._state_changed = False  # before the state is built: a later change re-sets it
        self._transport.publish(
            self._topics.device_state(self.device_id),
            encode(self._state("online")),
            qos=1,
            retain=True,
        )

    def _announce_state(self) -> None:
        try:
            self._publish_online()
        except FoglineError as exc:
            self._state_changed = True
            log.warning("could not publish the online state (%s); will retry", exc)

    def _announce_and_flush(self) -> None:
        try:
            self._publish_online()
            self._flush(None)
            with self._send_lock:
                if len(self.outbox) == 0:
                    self._connect_pending = False
                else:
                    self._wake.set()
        except FoglineError as exc:
            log.warning("telemetry flush interrupted (%s); will retry on reconnect", exc)
            if self._transport.connected:
                self._wake.set()
