"""Idle probes of the cloud client: unanswered rounds space out (doubling, capped), and
the first answer restores the configured interval."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from fogline.edge import CircuitBreaker, CloudClient
from fogline.protocol import (
    InferenceRequest,
    InferenceResponse,
    MqttMessage,
    Topics,
    decode,
    encode,
)


class _FakeTransport:
    """Just enough of MqttTransport: records probe times; answers them while ``up``."""

    connected = True

    def __init__(self) -> None:
        self.up = False
        self.sent: list[float] = []
        self._handler: Any = None
        self._lock = threading.Lock()

    def subscribe(self, topic: str, handler: Any, qos: int = 1, **_kw: Any) -> None:
        self._handler = handler

    def unsubscribe(self, topic: str) -> None:
        self._handler = None

    def publish(self, topic: str, payload: bytes, **_kw: Any) -> None:
        request = decode(payload, InferenceRequest)
        with self._lock:
            self.sent.append(time.monotonic())
        if self.up and self._handler is not None:
            reply = InferenceResponse(
                correlation_id=request.correlation_id,
                model=request.model,
                version=1,
                outputs={},
                service_ms=1.0,
            )
            msg = MqttMessage(request.reply_to, encode(reply), 0, False)
            # As from the network thread: after publish() returns.
            threading.Timer(0.001, self._handler, args=(msg,)).start()

    def count(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t in self.sent if t >= since)


def _client(transport: _FakeTransport, **kwargs: Any) -> CloudClient:
    return CloudClient(
        transport,  # type: ignore[arg-type]
        Topics("fogline-test/probes"),
        "dev-1",
        # Never opens: only the probes' own spacing is under test.
        breaker=CircuitBreaker(failure_threshold=10_000, min_calls=20, failure_rate=1.0),
        probe_timeout_s=0.02,
        watch=["m"],
        **kwargs,
    )


def test_unanswered_probes_back_off_up_to_the_cap() -> None:
    transport = _FakeTransport()
    client = _client(transport, probe_interval_s=0.05, probe_backoff_max_s=0.4)
    client.start()
    try:
        time.sleep(2.0)
    finally:
        client.close()
    times = transport.sent
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Without the backoff: one probe every ~0.07 s (interval plus timeout), ~28 of them.
    assert 5 <= len(times) <= 10, times
    # Each gap is the doubled wait plus the timeout; the wait never exceeds the cap.
    assert all(b >= a * 1.3 for a, b in itertools.pairwise(gaps[:3])), gaps
    assert max(gaps) < 0.4 + 0.02 + 0.15, gaps


def test_an_answer_restores_the_probe_interval() -> None:
    transport = _FakeTransport()
    client = _client(transport, probe_interval_s=0.05, probe_backoff_max_s=5.0)
    client.start()
    try:
        time.sleep(0.5)  # rounds go unanswered: the wait has grown to 0.4 s and more
        transport.up = True
        deadline = time.monotonic() + 5.0
        while client.rtt_ms is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.rtt_ms is not None
        answered = time.monotonic()
        time.sleep(0.6)
        # Back to one probe per interval (~0.05 s), not one per backed-off wait.
        assert transport.count(since=answered) >= 6
    finally:
        client.close()


def test_a_fast_probe_resets_a_round_trip_raised_by_congestion() -> None:
    transport = _FakeTransport()
    transport.up = True
    client = _client(transport, probe_interval_s=0.0)  # probes by hand only
    client.start()
    try:
        with client._lock:
            client._rtt.value = 400.0  # as left by requests queued in a congested cloud
        measured = client.probe("m")
        assert client.rtt_ms == measured < 400.0
        # A slower probe is averaged in, not taken as it is.
        with client._lock:
            client._rtt.value = 0.001
        client.probe("m")
        assert client.rtt_ms is not None and client.rtt_ms < 1.0
    finally:
        client.close()


def test_a_busy_reply_brings_a_probe_soon_that_replaces_the_guess() -> None:
    transport = _FakeTransport()
    transport.up = True
    client = _client(transport, probe_interval_s=30.0)  # no idle probe during the test
    client.start()
    try:
        deadline = time.monotonic() + 5
        while client.rtt_ms is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.rtt_ms is not None  # the first probe, at start
        sent = transport.count()
        # A request the cloud was too busy for: its time in the cloud is guessed high ...
        client._busy("m", 0.5)
        assert (client.service_ms("m") or 0.0) > 100.0
        deadline = time.monotonic() + 2
        while transport.count() == sent and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        # ... until a probe, sent at once instead of after 30 s, brings the cloud's view.
        assert transport.count() == sent + 1
        assert client.service_ms("m") == 1.0
    finally:
        client.close()
