"""A circuit breaker for the cloud path.

States (the wire's :data:`fogline.protocol.BreakerState`)::

    closed ──(N consecutive failures, or failure rate over the window)──▶ open
    open ──(cool-down elapsed)──▶ half_open
    half_open ──(trial succeeds)──▶ closed
    half_open ──(trial fails)──▶ open (cool-down starts again)

While open, :meth:`CircuitBreaker.allow` says no at once, so the agent never waits on a
cloud that is down. In half-open a limited number of trials (a light probe or a real
request) may go through. Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fogline.protocol import BreakerState, ConfigError

__all__ = ["BreakerSnapshot", "CircuitBreaker"]

log = logging.getLogger("fogline.edge.breaker")

StateListener = Callable[[BreakerState, BreakerState], None]


@dataclass(frozen=True)
class BreakerSnapshot:
    """A consistent view of the breaker, e.g. for heartbeats and ``status``."""

    state: BreakerState
    consecutive_failures: int
    window_failure_rate: float
    opened_count: int
    retry_in_s: float


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures, or when at least
    ``min_calls`` of the last ``window`` outcomes hold a failure share of
    ``failure_rate`` or more. Half-opens after ``cooldown_s``."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        failure_rate: float = 0.5,
        window: int = 20,
        min_calls: int = 10,
        cooldown_s: float = 5.0,
        half_open_trials: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError("breaker.failure_threshold must be at least 1")
        if not 0 < failure_rate <= 1:
            raise ConfigError("breaker.failure_rate must be in (0, 1]")
        if window < 1 or not 1 <= min_calls <= window:
            raise ConfigError("breaker.window must be >= 1 and breaker.min_calls in [1, window]")
        if cooldown_s <= 0:
            raise ConfigError("breaker.cooldown_s must be positive")
        if half_open_trials < 1:
            raise ConfigError("breaker.half_open_trials must be at least 1")
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.cooldown_s = cooldown_s
        self.half_open_trials = half_open_trials
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._consecutive = 0
        self._opened_at = 0.0
        self._opened_count = 0
        self._trials: deque[float] = deque()  # start times of trials in flight
        self._listeners: list[StateListener] = []

    # -- queries --------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
        self._notify(changes)
        return state

    def snapshot(self) -> BreakerSnapshot:
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
            retry = 0.0
            if state == "open":
                retry = max(0.0, self._opened_at + self.cooldown_s - self._clock())
            snap = BreakerSnapshot(
                state=state,
                consecutive_failures=self._consecutive,
                window_failure_rate=self._rate(),
                opened_count=self._opened_count,
                retry_in_s=retry,
            )
        self._notify(changes)
        return snap

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(old, new)`` on every state change (outside the lock)."""
        self._listeners.append(listener)

    # -- the protocol: allow, then record ----------------------------------------------------
    def allow(self) -> bool:
        """May a call go to the cloud now? In half-open, a ``True`` is a trial: the caller
        must report its outcome with :meth:`record_success` or :meth:`record_failure`."""
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
            if state == "closed":
                allowed = True
            elif state == "open":
                allowed = False
            else:
                now = self._clock()
                # A trial that never reported back must not wedge the breaker half-open.
                while self._trials and now - self._trials[0] > self.cooldown_s:
                    self._trials.popleft()
                allowed = len(self._trials) < self.half_open_trials
                if allowed:
                    self._trials.append(now)
        self._notify(changes)
        return allowed

    def would_allow(self) -> bool:
        """Like :meth:`allow` but reserves no trial: for estimates and routing decisions."""
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
            allowed = state == "closed" or (
                state == "half_open" and len(self._trials) < self.half_open_trials
            )
        self._notify(changes)
        return allowed

    def record_success(self) -> None:
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
            self._consecutive = 0
            self._outcomes.append(False)
            if state == "half_open":
                self._transition("closed", changes)
        self._notify(changes)

    def record_failure(self) -> None:
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            state = self._advance(changes)
            self._consecutive += 1
            self._outcomes.append(True)
            if state == "half_open" or (state == "closed" and self._should_trip()):
                self._transition("open", changes)
        self._notify(changes)

    def reset(self) -> None:
        """Close the breaker and forget history (e.g. after a reconfiguration)."""
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            self._consecutive = 0
            self._outcomes.clear()
            self._transition("closed", changes)
        self._notify(changes)

    # -- internals (lock held) ---------------------------------------------------------------
    def _rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def _should_trip(self) -> bool:
        if self._consecutive >= self.failure_threshold:
            return True
        return len(self._outcomes) >= self.min_calls and self._rate() >= self.failure_rate

    def _advance(self, changes: list[tuple[BreakerState, BreakerState]]) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._transition("half_open", changes)
        return self._state

    def _transition(
        self, new: BreakerState, changes: list[tuple[BreakerState, BreakerState]]
    ) -> None:
        old = self._state
        if old == new:
            return
        self._state = new
        self._trials.clear()
        if new == "open":
            self._opened_at = self._clock()
            self._opened_count += 1
        elif new == "closed":
            self._outcomes.clear()
            self._consecutive = 0
        changes.append((old, new))

    def _notify(self, changes: list[tuple[BreakerState, BreakerState]]) -> None:
        for old, new in changes:
            log.info("cloud breaker %s -> %s", old, new)
            for listener in list(self._listeners):
                try:
                    listener(old, new)
                except Exception:
                    log.exception("breaker listener raised")
