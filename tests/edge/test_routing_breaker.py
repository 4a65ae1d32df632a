"""The cloud circuit breaker: transitions, rate trips, trials, thread safety."""

from __future__ import annotations

import threading

import pytest

from fogline.edge._breaker import CircuitBreaker
from fogline.protocol import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw: object) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(clock=clock, **kw), clock  # type: ignore[arg-type]


def test_opens_after_consecutive_failures_and_refuses_at_once() -> None:
    breaker, _ = make(failure_threshold=3, cooldown_s=5)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert not breaker.would_allow()
    assert breaker.snapshot().opened_count == 1


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = make(failure_threshold=3, failure_rate=0.9, min_calls=20, window=20)
    for _ in range(10):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"


def test_failure_rate_over_the_window_trips() -> None:
    breaker, _ = make(failure_threshold=100, failure_rate=0.5, window=10, min_calls=10)
    for _ in range(5):
        breaker.record_success()
        breaker.record_failure()
    assert breaker.state == "open"


def test_rate_needs_min_calls() -> None:
    breaker, _ = make(failure_threshold=100, failure_rate=0.5, window=10, min_calls=10)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_half_open_after_cooldown_then_success_closes() -> None:
    breaker, clock = make(failure_threshold=1, cooldown_s=5)
    changes: list[tuple[str, str]] = []
    breaker.add_listener(lambda old, new: changes.append((old, new)))
    breaker.record_failure()
    clock.now += 4.9
    assert breaker.state == "open"
    assert breaker.snapshot().retry_in_s == pytest.approx(0.1)
    clock.now += 0.2
    assert breaker.state == "half_open"
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one trial at a time
    breaker.record_success()
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_half_open_failure_reopens_with_a_fresh_cooldown() -> None:
    breaker, clock = make(failure_threshold=1, cooldown_s=5)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 4
    assert breaker.state == "open"
    clock.now += 1
    assert breaker.state == "half_open"


def test_a_lost_trial_does_not_wedge_half_open() -> None:
    breaker, clock = make(failure_threshold=1, cooldown_s=2)
    breaker.record_failure()
    clock.now += 2
    assert breaker.allow()
    assert not breaker.allow()
    clock.now += 2.5  # the trial never reported back
    assert breaker.allow()


def test_reset_closes() -> None:
    breaker, _ = make(failure_threshold=1)
    breaker.record_failure()
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.allow()


def test_a_raising_listener_is_contained() -> None:
    breaker, _ = make(failure_threshold=1)

    def bad(old: str, new: str) -> None:
        raise RuntimeError("boom")

    breaker.add_listener(bad)
    breaker.record_failure()
    assert breaker.state == "open"


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_threshold": 0},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"window": 5, "min_calls": 6},
        {"cooldown_s": 0},
        {"half_open_trials": 0},
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker(**kw)  # type: ignore[arg-type]


def test_concurrent_failures_open_exactly_once() -> None:
    breaker = CircuitBreaker(failure_threshold=50, cooldown_s=60)
    opened: list[str] = []
    breaker.add_listener(lambda old, new: opened.append(new) if new == "open" else None)

    def hammer() -> None:
        for _ in range(100):
            breaker.allow()
            breaker.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.state == "open"
    assert opened == ["open"]
