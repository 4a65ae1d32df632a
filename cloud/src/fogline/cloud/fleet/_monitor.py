"""The fleet monitor: MQTT in, device registry out.

Three threads do the work:

- the MQTT network thread runs :meth:`FleetMonitor._on_message`: parse the topic, decode,
  check the device id, enqueue. Nothing else, so ingest stays fast;
- the writer thread drains the queue in batches, one store transaction per batch;
- the sweeper thread asks the writer, through the same queue, to mark silent devices
  offline. Going through the queue orders a sweep after every heartbeat received
  before it, so a device is never declared dead while its heartbeat waits in line.

With ``shared_group``, heartbeats and events are subscribed as ``$share/<group>/...`` so
replicas split them. Device state is subscribed by every replica *without* sharing: MQTT
never delivers retained messages to a shared subscription, and the retained state
(including last wills) is what tells a fresh replica which devices are offline.
Applying the same state twice is harmless.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fogline.protocol import (
    DecodeError,
    DeviceEvent,
    DeviceState,
    FleetError,
    FleetStoreUnavailableError,
    Heartbeat,
    Message,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    TopicError,
    Topics,
    decode,
    validate_id,
)

from ._store import FleetStore, Observed, Sweep

__all__ = ["FleetMonitor", "MonitorStats", "RejectReason"]

log = logging.getLogger("fogline.fleet")

Leaf = Literal["state", "heartbeat", "events"]
RejectReason = Literal["bad_topic", "decode_error", "wrong_type", "device_mismatch"]
_EXPECTED: dict[Leaf, type[Message]] = {
    "state": DeviceState,
    "heartbeat": Heartbeat,
    "events": DeviceEvent,
}
_STOP = object()
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 5.0
_ATTEMPTS_WHEN_STOPPING = 3


class MonitorStats(BaseModel):
    """What this monitor replica has seen since it started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    received: dict[str, int]
    rejected: dict[str, int]
    applied: int
    batches: int
    marked_offline: int
    write_retries: int
    write_failures: int
    queue_depth: int

    @property
    def accepted(self) -> int:
        return sum(self.received.values()) - sum(self.rejected.values())


class FleetMonitor:
    """Consume device state, heartbeats and events into a :class:`FleetStore`.

    ``transport`` is either :class:`MqttSettings` (the monitor owns and closes its own
    client) or a running :class:`MqttTransport` shared with other services (left open).
    A device is marked offline on its last will, or after ``missed_heartbeats`` times its
    heartbeat interval (the ``interval_s`` it reports, else ``heartbeat_interval_s``)
    without a heartbeat, whichever comes first.
    """

    def __init__(
        self,
        transport: MqttSettings | MqttTransport,
        store: FleetStore,
        topics: Topics | None = None,
        heartbeat_interval_s: float = 10.0,
        missed_heartbeats: int = 3,
        shared_group: str | None = None,
        clock: Callable[[], float] = time.time,
        *,
        batch_max: int = 2000,
        queue_max: int = 100_000,
        sweep_period_s: float | None = None,
        linger_s: float = 0.02,
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise FleetError("heartbeat_interval_s must be positive")
        if missed_heartbeats < 1:
            raise FleetError("missed_heartbeats must be at least 1")
        self.store = store
        self.topics = topics or Topics()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed_heartbeats = missed_heartbeats
        self.shared_group = validate_id(shared_group, "shared group") if shared_group else None
        self._clock = clock
        self._batch_max = batch_max
        self._linger_s = linger_s
        # A full queue blocks the network thread: back-pressure to the broker rather
        # than dropping accepted telemetry.
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_max)
        self._sweep_period = sweep_period_s or min(1.0, max(0.05, heartbeat_interval_s / 4))
        if isinstance(transport, MqttTransport):
            self._transport, self._owns_transport = transport, False
        else:
            client_id = f"fogline-fleet-{uuid.uuid4().hex[:10]}"
            self._transport, self._owns_transport = (
                MqttTransport(transport, client_id=client_id),
                True,
            )
        self._stats_lock = threading.Lock()
        self._received: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._applied = self._batches = self._marked_offline = 0
        self._write_retries = self._write_failures = 0
        self._gave_up = False  # a store write given up on while stopping
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._filters: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, connect_timeout: float = 10.0) -> None:
        """Start the writer and sweeper, subscribe, and (if the monitor owns its
        transport) connect, raising BrokerUnavailableError if the broker does not answer."""
        if self._threads:
            return
        self._started_at = self._clock()
        self._threads = [
            threading.Thread(target=self._write_loop, name="fleet-writer", daemon=True),
            threading.Thread(target=self._sweep_loop, name="fleet-sweeper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        for leaf in ("state", "heartbeat", "events"):
            topic_filter = self.topics.all_device(leaf)
            if self.shared_group and leaf != "state":
                topic_filter = f"$share/{self.shared_group}/{topic_filter}"
            self._transport.subscribe(topic_filter, self._handler(leaf), qos=1)
            self._filters.append(topic_filter)
        if self._owns_transport:
            try:
                self._transport.connect(connect_timeout)
            except BaseException:
                self._stop_threads()
                raise
        log.info("fleet monitor started on %s, store %s", self._filters, self.store.location)

    def close(self, timeout: float = 10.0) -> None:
        """Unsubscribe, write everything already received, and stop the threads. The
        store stays open: whoever opened it closes it."""
        if not self._threads:
            return
        if self._owns_transport:
            self._transport.close()
        else:
            for topic_filter in self._filters:
                self._transport.unsubscribe(topic_filter)
        self._stop_threads(timeout)
        log.info("fleet monitor stopped: %s", self.stats().model_dump())

    def _stop_threads(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def __enter__(self) -> FleetMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._transport.connected

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything received so far is in the store. True if it is."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def sweep_now(self) -> None:
        """Queue an offline sweep at the current clock (also done periodically)."""
        self._queue.put(self._make_sweep())

    def stats(self) -> MonitorStats:
        with self._stats_lock:
            return MonitorStats(
                received=dict(self._received),
                rejected=dict(self._rejected),
                applied=self._applied,
                batches=self._batches,
                marked_offline=self._marked_offline,
                write_retries=self._write_retries,
                write_failures=self._write_failures,
                queue_depth=self._queue.qsize(),
            )

    # -- network thread -------------------------------------------------------------------
    def _handler(self, leaf: Leaf) -> Callable[[MqttMessage], None]:
        expected = _EXPECTED[leaf]

        def handle(msg: MqttMessage) -> None:
            self._on_message(leaf, expected, msg)

        return handle

    def _on_message(self, leaf: Leaf, expected: type[Message], msg: MqttMessage) -> None:
        if leaf == "state" and not msg.payload:
            return  # a retained state cleared (`fogline fleet forget`): nothing to record
        received_at = self._clock()
        reason: RejectReason | None = None
        detail = ""
        message: Message | None = None
        try:
            device_id = self.topics.parse(msg.topic).device_id
            message = decode(msg.payload)
        except TopicError as exc:
            reason, detail = "bad_topic", exc.message
        except DecodeError as exc:
            reason, detail = "decode_error", exc.message
        else:
            if not isinstance(message, expected):
                reason, detail = "wrong_type", f"a {message.message_type} on a {leaf} topic"
            elif getattr(message, "device_id", None) != device_id:
                reason = "device_mismatch"
                detail = (
                    f"message for {getattr(message, 'device_id', None)!r} on {device_id!r}'s topic"
                )
        with self._stats_lock:
            self._received[leaf] += 1
            if reason is not None:
                self._rejected[reason] += 1
                first = self._rejected[reason] == 1
        if reason is not None:
            # Telemetry from a misbehaving device could flood the log: warn once per
            # reason, then only count (the counts are in stats() and the metrics).
            (log.warning if first else log.debug)(
                "ignored message on %s (%s): %s", msg.topic, reason, detail
            )
            return
        assert isinstance(message, DeviceState | Heartbeat | DeviceEvent)
        self._queue.put(Observed(message, received_at))

    # -- writer and sweeper -----------------------------------------------------------------
    def _make_sweep(self) -> Sweep:
        return Sweep(
            now=self._clock(),
            grace_since=self._started_at,
            missed_heartbeats=self.missed_heartbeats,
            default_interval_s=self.heartbeat_interval_s,
        )

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self._sweep_period):
            self._queue.put(self._make_sweep())

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            if batch[0] is not _STOP and self._linger_s > 0:
                # Let a batch gather: waking per message costs a GIL hand-over and a
                # transaction each, which caps ingest far below what the broker sends.
                time.sleep(self._linger_s)
            while len(batch) < self._batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                stopping = self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[object]) -> bool:
        """Apply a batch in order; sweeps split it. Returns True on the stop marker."""
        pending: list[Observed] = []
        for item in batch:
            if isinstance(item, Observed):
                pending.append(item)
                continue
            self._apply(pending)
            pending = []
            if item is _STOP:
                return True
            if isinstance(item, Sweep):
                self._sweep(item)
        self._apply(pending)
        return False

    def _apply(self, items: list[Observed], *, one_of_a_batch: bool = False) -> int:
        """Write ``items`` in one transaction; returns how many were dropped."""
        if not items:
            return 0
        failures = 0
        while True:
            try:
                applied = self.store.apply(items)
            except FleetStoreUnavailableError as exc:
                # The database is down or locked: hold the batch until it is back. The
                # queue fills meanwhile, then back-pressure reaches the broker, which
                # keeps the rest (QoS 1). Only a monitor that is stopping gives up.
                failures += 1
                with self._stats_lock:
                    self._write_retries += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "fleet store unavailable (%d failed writes): %s", failures, exc.message
                    )
                if self._stop.is_set():
                    # Stopping: a few tries, and none for the batches after one that
                    # gave up, so close() is not held up by a database that is gone.
                    if self._gave_up or failures >= _ATTEMPTS_WHEN_STOPPING:
                        self._gave_up = True
                        break
                    time.sleep(_RETRY_FIRST_S * failures)
                else:
                    self._stop.wait(min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** min(failures, 6)))
                continue
            except FleetError as exc:
                # Not a passing outage: trying again will not help. A corrupt record of
                # one device must not cost the others their messages, so a batch is
                # written again one message per transaction and only what fails is lost.
                failures += 1
                if one_of_a_batch:
                    log.debug("fleet message dropped: %s", exc.message)
                    break
                log.warning("fleet store write of %d failed: %s", len(items), exc.message)
                if len(items) > 1:
                    dropped = sum(self._apply([i], one_of_a_batch=True) for i in items)
                    log.error("wrote %d messages one by one, dropped %d", len(items), dropped)
                    return dropped
                break
            with self._stats_lock:
                self._applied += applied
                self._batches += 1
            if failures:
                log.info("fleet store write succeeded after %d failed attempts", failures)
            return 0
        with self._stats_lock:
            self._write_failures += len(items)
        if not one_of_a_batch:
            log.error("dropped %d fleet messages after %d failed writes", len(items), failures)
        return len(items)

    def _sweep(self, sweep: Sweep) -> None:
        try:
            gone = self.store.sweep(sweep)
        except FleetError as exc:
            log.warning("offline sweep failed: %s", exc.message)
            return
        if gone:
            with self._stats_lock:
                self._marked_offline += len(gone)
            log.info("marked offline after missed heartbeats: %s", ", ".join(gone))
