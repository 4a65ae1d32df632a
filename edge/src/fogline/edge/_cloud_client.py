"""The edge's client for cloud inference over MQTT.

A request goes to ``infer/{model}/requests`` with ``reply_to`` set to this device's
``inbox/infer`` topic, a fresh correlation id and an absolute deadline (epoch seconds, so
edge and cloud clocks must be roughly in sync, e.g. NTP; the deadline only lets the
cloud drop stale work, the client's own timeout is what bounds the wait). One inbox
subscription resolves the pending futures by correlation id.

**Probes.** A probe is an ``InferenceRequest`` whose only input is the empty uint8
tensor named :data:`PROBE_INPUT`. The bridge answers it at once, without Serve, with an
``InferenceResponse`` whose ``service_ms`` is how long a request arriving now would
spend in the cloud (0 until measured). So one probe refreshes both halves of the cloud
estimate: the round trip through broker and bridge, and the time in the cloud (a probe
replaces the latter outright: it is the cloud's current view, fresher than any
average; a probe faster than the round-trip estimate replaces that too, since requests
queued in a congested cloud had raised it). While the client is idle it probes its
watched models every ``probe_interval_s``; in half-open the probe is the breaker's
trial. Rounds of probes that the cloud leaves unanswered (none there, or down) space
out: the wait doubles after each, up to ``probe_backoff_max_s``, and any answer
restores the interval.

**Down or busy.** The :class:`CircuitBreaker` is for outages: a lost link, a reply
saying the cloud is unavailable, or a timeout while the cloud has answered nothing since
the request was sent. A cloud that answers, but not in time for this request (a timeout
while other answers arrive, or an ``over_capacity`` / ``deadline_exceeded`` reply), is
busy, not down: the request fails, the breaker counts the path as working, and the
estimate of the time in the cloud takes what this request was allowed as a sample (the
cloud needed at least that), so the router offloads less until answers (or, once idle,
probes) show the cloud has caught up. Tripping the breaker on a busy cloud would turn
a slow path into no path for a whole cool-down, and push every request onto the local
queue the cloud was relieving.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from fogline.protocol import (
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    DecodeError,
    ErrorReply,
    FoglineError,
    InferenceInputError,
    InferenceRequest,
    InferenceResponse,
    MqttMessage,
    MqttTransport,
    Tensor,
    Topics,
    TransportError,
    UnknownModelError,
    decode,
    encode,
    validate_id,
)

from ._breaker import CircuitBreaker
from ._routing import CloudResult, CloudState

__all__ = ["PROBE_INPUT", "CloudClient", "CloudClientStats", "reply_error"]

log = logging.getLogger("fogline.edge.cloud")

PROBE_INPUT = "fogline.probe"
"""The input name that marks a light probe (mirrored in ``fogline.cloud.serving``)."""

_PROBE_TENSOR = Tensor(dtype="uint8", shape=[0], data=b"")
# Error-reply codes that say the cloud path itself is unhealthy (feed the breaker) ...
_PATH_FAILURES = frozenset({"cloud_unavailable"})
# ... and those that say it is alive but too busy for this request (feed the estimate).
_BUSY_REPLIES = frozenset({"over_capacity", "deadline_exceeded"})
_DEV_BETA = 0.25  # weight of a new sample in the mean deviation (as TCP's RTTVAR)
_BUSY_PROBE_GAP_S = 0.05  # shortest time between two probes sent after busy replies


def reply_error(reply: ErrorReply) -> FoglineError:
    """Translate an error reply from the cloud into a Fogline error."""
    text = f"cloud: {reply.message}"
    match reply.code:
        case "deadline_exceeded" | "budget_exceeded":
            return BudgetExceededError(text)
        case "unknown_model":
            return UnknownModelError(text)
        case "invalid_input" | "tensor_error":
            return InferenceInputError(text)
        case "over_capacity":
            return CapacityError(text)
        case "decode_error":
            return DecodeError(text)
    return CloudUnavailableError(f"{text} ({reply.code})")


@dataclass
class CloudClientStats:
    sent: int = 0
    replies: int = 0
    timeouts: int = 0
    error_replies: int = 0
    busy: int = 0  # timeouts and busy replies while the cloud was answering others
    refused_by_breaker: int = 0
    probes: int = 0
    stray_replies: int = 0  # no pending request (timed out already, or not ours)
    malformed_replies: int = 0


@dataclass
class _Pending:
    future: Future[InferenceResponse | ErrorReply]
    sent_at: float
    model: str
    probe: bool


class _Ewma:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> None:
        old = self.value
        self.value = sample if old is None else old + self.alpha * (sample - old)


class CloudClient:
    """Cloud inference for one device. Thread-safe; :meth:`infer` blocks the caller
    only, never the MQTT network thread."""

    def __init__(
        self,
        transport: MqttTransport,
        topics: Topics,
        device_id: str,
        *,
        breaker: CircuitBreaker | None = None,
        timeout_s: float = 2.0,
        probe_interval_s: float = 1.0,
        probe_timeout_s: float = 1.0,
        probe_backoff_max_s: float = 30.0,
        watch: Iterable[str] = (),
        alpha: float = 0.2,
        unserved_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.device_id = validate_id(device_id, "device id")
        self.breaker = breaker or CircuitBreaker()
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.probe_backoff_max_s = probe_backoff_max_s
        self.unserved_ttl_s = unserved_ttl_s
        self.stats = CloudClientStats()
        self.reply_topic = topics.inbox(self.device_id, "infer")
        self._alpha = alpha
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._rtt = _Ewma(alpha)
        self._service: dict[str, _Ewma] = {}
        self._deviation: dict[str, float] = {}  # mean deviation of a request's round trip
        self._unserved: dict[str, float] = {}
        self._watched: set[str] = {validate_id(m, "model") for m in watch}
        self._last_sent = float("-inf")
        self._last_answer = float("-inf")  # when the cloud last answered a real request
        self._last_reply = float("-inf")  # when the cloud last answered anything of ours
        self._quiet_rounds = 0  # probe rounds in a row that the cloud left unanswered
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by close() and by a busy cloud: probe now
        self._probe_soon = False  # the cloud was too busy for a request: ask its view
        self._last_probe = float("-inf")
        self._prober: threading.Thread | None = None
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._stop.clear()
        self.transport.subscribe(self.reply_topic, self._on_reply, qos=0)
        if self.probe_interval_s > 0:
            self._prober = threading.Thread(
                target=self._probe_loop, name="fogline-cloud-probe", daemon=True
            )
            self._prober.start()

    def close(self) -> None:
        """Stop probing, unsubscribe and fail every pending request at once."""
        self._stop.set()
        self._wake.set()
        if self._prober is not None:
            self._prober.join(timeout=5.0)
            self._prober = None
        if self._started:
            try:
                self.transport.unsubscribe(self.reply_topic)
            except FoglineError:
                log.debug("unsubscribe on close failed", exc_info=True)
        self._started = False
        with self._lock:
            pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.future.set_exception(CloudUnavailableError("the cloud client was closed"))

    def __enter__(self) -> CloudClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch(self, model: str) -> None:
        """Probe ``model`` while idle, so its estimate stays fresh."""
        with self._lock:
            self._watched.add(validate_id(model, "model"))

    # -- estimates --------------------------------------------------------------------------
    @property
    def rtt_ms(self) -> float | None:
        with self._lock:
            return self._rtt.value

    def service_ms(self, model: str) -> float | None:
        with self._lock:
            ewma = self._service.get(model)
            return ewma.value if ewma else None

    def state(self, model: str) -> CloudState:
        """The router's view of the cloud path for ``model``."""
        with self._lock:
            until = self._unserved.get(model)
            serves = until is None or self._clock() >= until
            ewma = self._service.get(model)
            rtt, service = self._rtt.value, ewma.value if ewma else None
            deviation = self._deviation.get(model, 0.0)
        available = self._started and self.transport.connected and self.breaker.would_allow()
        return CloudState(
            available=available,
            serves_model=serves,
            rtt_ms=rtt,
            service_ms=service,
            deviation_ms=deviation,
        )

    # -- requests ---------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        version: int | None = None,
    ) -> CloudResult:
        """Run ``model`` in the cloud. Raises :class:`CloudUnavailableError` (breaker open,
        no link, no reply in time), or the translated error reply."""
        tensors = {name: Tensor.from_numpy(np.asarray(value)) for name, value in inputs.items()}
        timeout = self.timeout_s if timeout_s is None else timeout_s
        reply, rtt_ms = self._call(model, tensors, timeout, version=version, probe=False)
        outputs = {name: t.to_numpy() for name, t in reply.outputs.items()}
        return CloudResult(outputs, reply.version, reply.service_ms, rtt_ms)

    def probe(self, model: str, *, timeout_s: float | None = None) -> float:
        """Send one light probe; returns the measured round trip in ms."""
        timeout = self.probe_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            self.stats.probes += 1
        _reply, rtt_ms = self._call(model, {PROBE_INPUT: _PROBE_TENSOR}, timeout, probe=True)
        return rtt_ms

    def _call(
        self,
        model: str,
        tensors: dict[str, Tensor],
        timeout_s: float,
        *,
        version: int | None = None,
        probe: bool,
    ) -> tuple[InferenceResponse, float]:
        if not self._started:
            raise CloudUnavailableError("the cloud client is not started")
        if not self.breaker.allow():
            with self._lock:
                self.stats.refused_by_breaker += 1
            raise CloudUnavailableError(f"cloud breaker is {self.breaker.state}; not calling")
        correlation = uuid.uuid4().hex
        request = InferenceRequest(
            correlation_id=correlation,
            reply_to=self.reply_topic,
            model=model,
            version=version,
            inputs=tensors,
            deadline=self._wall() + timeout_s,
            device_id=self.device_id,
        )
        future: Future[InferenceResponse | ErrorReply] = Future()
        sent_at = self._clock()
        with self._lock:
            self._pending[correlation] = _Pending(future, sent_at, model, probe)
            self.stats.sent += 1
            if not probe:
                self._last_sent = sent_at
        try:
            # QoS 0: a lost request is a timeout, handled below; an acknowledged one
            # would cost a round of PUBACKs per request and be no use past its deadline.
            self.transport.publish(self.topics.infer_requests(model), encode(request), qos=0)
            reply = future.result(timeout=timeout_s)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(correlation, None)
                self.stats.timeouts += 1
                answering = self._last_answer > sent_at
            if answering:
                self.breaker.record_success()  # busy, not down: see the module docstring
                self._busy(model, timeout_s)
            else:
                self.breaker.record_failure()
            raise CloudUnavailableError(
                f"no reply from the cloud for {model} within {timeout_s * 1000:.0f} ms"
                + (" (the cloud is busy)" if answering else "")
            ) from None
        except (TransportError, CloudUnavailableError) as exc:
            with self._lock:
                self._pending.pop(correlation, None)
            self.breaker.record_failure()
            raise CloudUnavailableError(f"cloud request for {model}: {exc.message}") from None
        rtt_ms = (self._clock() - sent_at) * 1000.0
        if isinstance(reply, ErrorReply):
            self._on_error_reply(model, reply, timeout_s)
        self.breaker.record_success()
        with self._lock:
            self._unserved.pop(model, None)
            service = self._service.setdefault(model, _Ewma(self._alpha))
            if probe:
                if reply.service_ms > 0:
                    service.value = reply.service_ms
                # A probe skips the cloud's queue: one that comes back faster than the
                # estimate shows the path has drained now (congested requests raised
                # it), so it sets the figure; a slower one is averaged in as usual.
                if self._rtt.value is not None and rtt_ms < self._rtt.value:
                    self._rtt.value = rtt_ms
                else:
                    self._rtt.update(rtt_ms)
                # The cloud's current view agrees with itself: a sample that missed by
                # nothing, so a deviation left from a busy spell fades while no real
                # request goes (it would otherwise keep the router away for good).
                if model in self._deviation:
                    self._deviation[model] *= 1.0 - _DEV_BETA
            else:
                self._deviate(model, rtt_ms, service.value)
                service.update(reply.service_ms)
                self._rtt.update(max(0.0, rtt_ms - reply.service_ms))
        return reply, rtt_ms

    def _deviate(self, model: str, total_ms: float, service_ms: float | None) -> None:
        """Fold one request's whole round trip into its mean deviation from the
        estimate (lock held). Probes do not count: they skip the cloud's queue."""
        if self._rtt.value is None or service_ms is None:
            return
        miss = abs(total_ms - (self._rtt.value + service_ms))
        old = self._deviation.get(model)
        self._deviation[model] = miss if old is None else old + _DEV_BETA * (miss - old)

    def _on_error_reply(self, model: str, reply: ErrorReply, timeout_s: float) -> NoReturn:
        with self._lock:
            self.stats.error_replies += 1
            if reply.code == "unknown_model":
                self._unserved[model] = self._clock() + self.unserved_ttl_s
        if reply.code in _PATH_FAILURES:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
            if reply.code in _BUSY_REPLIES:
                self._busy(model, timeout_s)
        raise reply_error(reply)

    def _busy(self, model: str, allowed_s: float) -> None:
        """The cloud is answering, but could not answer this request within
        ``allowed_s``: it needed at least that, so an estimate of the time in the cloud
        below that (minus the network's share) moves towards it, like any sample."""
        with self._lock:
            self.stats.busy += 1
            rtt = self._rtt.value or 0.0
            service = self._service.setdefault(model, _Ewma(self._alpha))
            self._deviate(model, allowed_s * 1000.0, service.value)
            floor = max(0.0, allowed_s * 1000.0 - rtt)
            if service.value is None or service.value < floor:
                service.update(floor)
            # That floor is a guess made in a burst; the cloud's own view, from a probe
            # soon, replaces it (else it kept requests away until the next idle probe).
            self._probe_soon = True
        self._wake.set()

    # -- network thread -----------------------------------------------------------------------
    def _on_reply(self, msg: MqttMessage) -> None:
        try:
            reply = decode(msg.payload)
        except DecodeError as exc:
            with self._lock:
                self.stats.malformed_replies += 1
            log.warning("malformed reply on %s dropped: %s", msg.topic, exc.message)
            return
        if not isinstance(reply, InferenceResponse | ErrorReply):
            with self._lock:
                self.stats.malformed_replies += 1
            log.warning("unexpected %s on %s dropped", reply.message_type, msg.topic)
            return
        with self._lock:
            entry = self._pending.pop(reply.correlation_id, None)
            if entry is None:
                self.stats.stray_replies += 1
            else:
                self.stats.replies += 1
                self._last_reply = self._clock()
                self._quiet_rounds = 0
            # Any answer to a real request (even a late one) shows the cloud is up.
            if entry is None or not entry.probe:
                self._last_answer = self._clock()
        if entry is not None and not entry.future.done():
            entry.future.set_result(reply)

    # -- idle probing --------------------------------------------------------------------------
    def _probe_wait(self) -> float:
        # Until the first answer, probe soon (a just-started agent should know its cloud
        # before its first budgeted request); a failing probe still waits its timeout.
        # A cloud that answers no round is asked ever less often: every probe costs the
        # device a publish and a wake-up, for nothing while there is no cloud.
        with self._lock:
            known = self._rtt.value is not None
            quiet = self._quiet_rounds
        if quiet:
            cap = max(self.probe_interval_s, self.probe_backoff_max_s)
            return min(self.probe_interval_s * 2.0 ** min(quiet, 32), cap)
        if known or not self.transport.connected or self.breaker.state != "closed":
            return self.probe_interval_s
        return min(self.probe_interval_s, 0.05)

    def _probe_loop(self) -> None:
        while True:
            self._wake.wait(self._probe_wait())
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                now = self._clock()
                idle = now - self._last_sent >= self.probe_interval_s
                soon, self._probe_soon = self._probe_soon, False
                models = sorted(self._watched)
                gap = _BUSY_PROBE_GAP_S - (now - self._last_probe)
            if soon and gap > 0 and self._stop.wait(gap):  # one probe per gap at most
                return
            if not models or not self.transport.connected:
                continue
            # Probe while idle, or after a busy reply; in half-open also under load, so
            # the breaker can close.
            if not idle and not soon and self.breaker.state != "half_open":
                continue
            if not self.breaker.would_allow():
                continue
            started = self._clock()
            with self._lock:
                self._last_probe = started
            for model in models:
                if self._stop.is_set():
                    return
                try:
                    self.probe(model)
                except FoglineError as exc:
                    log.debug("probe of %s failed: %s", model, exc.message)
            with self._lock:
                if self._last_reply < started:
                    self._quiet_rounds += 1
