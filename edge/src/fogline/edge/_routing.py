"""Where a request runs: the routing policies, as pure logic.

:func:`decide` is a pure function of the request (budget, policy), the local state
(queue depth, service-time estimate, capacity), the cloud state (breaker, round trip,
service time) and the device's load hints. :class:`Router` executes a decision: it runs
locally through a callable the agent supplies, or asks the cloud through a
:class:`CloudPath` (the :class:`~fogline.edge.CloudClient` in production), handles the
cascade and falls back to local inference when the cloud fails.

Estimates (milliseconds)::

    local = service                                             (a slot is free)
          = (sum of what is left of the runs in flight
             + queue_depth * service) / concurrency + service   (all slots busy)
    cloud = rtt_ewma + cloud_service_ewma

What is left of a run in flight is the service time less how long it has been running
(never below zero); when the agent does not say how long its runs have been going, the
runs in flight count one service time in all.

Each estimate comes in two forms: *typical* and *confident*, which adds
:data:`CONFIDENT_DEVIATIONS` typical deviations to each service time (local: the median
absolute deviation of the last runs) or to the whole cloud round trip (cloud: its running
mean deviation), in the way TCP sets its retransmission timeout. ``local-first`` and
``cloud-first`` first look for a path whose confident estimate meets the budget (in
their order of preference); when neither surely does, they take, of the paths whose
typical estimate meets it, the one with the lower confident estimate: on a jittery
device or link, a path that meets the budget on average still misses it often, while
the other path may have room to spare.

The local estimate is a queue model; the router calibrates it with what local answers
actually took: latency minus the model's estimate (time spent outside the service
itself, such as waking a waiting request, or service times with a long tail), per
service time the model counted, over the last :data:`_ERROR_WINDOW` local answers. The
typical estimate adds the median of those errors, the confident one their
:data:`_ERROR_QUANTILE` quantile, each times the service times the request would wait
through (jitter adds up along a queue). Quantiles, not a mean and mean deviation: the
tail is what makes a request late, a mean deviation understated it (a p99 of 9 ms over
a mean deviation of 1 ms, measured), and one outlier moved a mean for dozens of
requests. A negative error counts as zero, so answers that came early never make the
router ignore a queue it can see.

An unknown estimate (nothing measured yet) counts as meeting the budget: the first
requests teach the estimator, and probes fill the cloud side while idle.

No path meets the budget: with ``on_no_path="run-late"`` the request runs anyway (locally
when it can) and its result is marked late; with ``"refuse"`` :func:`decide` raises
:class:`BudgetExceededError` at once. A cloud call never waits longer than the remaining
budget plus ``grace_ms``; if it fails and the model has a local variant, the request
runs locally, waiting for a slot at most what is left of its budget or, with nothing
left, the agent's ``capacity.default_max_wait_ms`` (so the bound is budget + grace +
that wait + one local service time), unless
``on_no_path="refuse"`` and the local estimate no longer fits the budget left: then it
is refused at once with :class:`BudgetExceededError`. A request that cannot meet its
budget anyway must not take a local slot from one that still can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fogline.protocol import (
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    FoglineError,
    UnknownModelError,
)

from ._capacity import percentile

__all__ = [
    "CONFIDENT_DEVIATIONS",
    "CloudPath",
    "CloudResult",
    "CloudState",
    "LoadHints",
    "LocalResult",
    "LocalState",
    "OnNoPath",
    "RouteDecision",
    "RoutedResult",
    "Router",
    "RoutingPolicy",
    "RoutingSettings",
    "RoutingStats",
    "Target",
    "decide",
    "estimate_cloud_ms",
    "estimate_local_ms",
    "service_periods",
    "should_escalate",
    "top1_confidence",
]

log = logging.getLogger("fogline.edge.routing")

CONFIDENT_DEVIATIONS = 3.0
"""How many mean deviations a confident estimate adds to each service time. Three, not
two: at 2x load on a speed-factor-6 device, local-first met the budget for 96.7-99.7%
(mean 98.5%) of requests over eight runs with three (and the local p98), 96.0-98.7%
(mean 97.7%) with two (and the local p95), interleaved in one session."""

_ERROR_WINDOW = 128  # local answers the calibration looks at, per model
_ERROR_QUANTILE = 0.98  # of their errors, for the confident local estimate
_ERROR_REFRESH = 8  # new answers between two recomputations of the quantiles

Target = Literal["edge", "cloud"]
OnNoPath = Literal["run-late", "refuse"]
Thermal = Literal["normal", "warm", "hot", "critical"]


class RoutingPolicy(StrEnum):
    LOCAL_FIRST = "local-first"
    CLOUD_FIRST = "cloud-first"
    LOCAL_ONLY = "local-only"
    CLOUD_ONLY = "cloud-only"
    CASCADE = "cascade"


class RoutingSettings(BaseModel):
    """The ``[routing]`` section of the agent's configuration (also ``RoutingConfig``)."""

    model_config = ConfigDict(extra="forbid")

    policy: RoutingPolicy = RoutingPolicy.LOCAL_FIRST
    default_budget_ms: float | None = Field(default=None, gt=0)
    cascade_threshold: float = Field(default=0.8, ge=0, le=1)
    cascade_output: str | None = None  # output holding class scores; None = the first
    on_no_path: OnNoPath = "run-late"
    grace_ms: float = Field(default=25.0, ge=0)
    cloud_timeout_ms: float = Field(default=2000.0, gt=0)  # for requests with no budget
    cpu_offload_above: float = Field(default=0.9, gt=0, le=1)
    battery_offload_below: float = Field(default=0.2, ge=0, le=1)
    # The cloud path: off, the agent never asks the cloud (no probes, no offload).
    cloud_enabled: bool = True
    probe_interval_s: float = Field(default=1.0, ge=0, le=3600)  # 0 = no idle probes
    probe_timeout_s: float = Field(default=1.0, gt=0, le=60)
    breaker_failures: int = Field(default=5, ge=1, le=10_000)  # consecutive, to open
    breaker_cooldown_s: float = Field(default=5.0, gt=0, le=3600)  # open -> half-open


@dataclass(frozen=True)
class LoadHints:
    """Device load signals, set by the firmware simulator or read from the OS.
    ``cpu_load`` and ``battery`` are fractions; ``None`` means unknown."""

    cpu_load: float | None = None
    battery: float | None = None
    thermal: Thermal = "normal"

    @classmethod
    def from_mapping(cls, hints: Mapping[str, float | str]) -> LoadHints:
        """From the agent's ``load_hints`` dict. ``thermal`` may be a word or a fraction
        of the throttling point (0.5 warm, 0.75 hot, 0.9 critical)."""
        thermal = hints.get("thermal", "normal")
        if not isinstance(thermal, str):
            level = float(thermal)
            thermal = (
                "critical"
                if level >= 0.9
                else "hot"
                if level >= 0.75
                else "warm"
                if level >= 0.5
                else "normal"
            )
        if thermal not in ("normal", "warm", "hot", "critical"):
            thermal = "normal"
        cpu, battery = hints.get("cpu_load"), hints.get("battery")
        return cls(
            cpu_load=None if cpu is None else float(cpu),
            battery=None if battery is None else float(battery),
            thermal=thermal,  # type: ignore[arg-type]
        )

    def stressed(self, settings: RoutingSettings) -> str | None:
        """Why the device would rather offload, or ``None``."""
        if self.thermal in ("hot", "critical"):
            return "thermal"
        if self.battery is not None and self.battery < settings.battery_offload_below:
            return "low_battery"
        if self.cpu_load is not None and self.cpu_load >= settings.cpu_offload_above:
            return "cpu_load"
        return None


@dataclass(frozen=True)
class LocalState:
    """The local path as the agent's admission control sees it: ``concurrency`` slots
    (its ``max_in_flight``), ``in_flight`` of them busy, ``queue_depth`` requests
    waiting, at most ``max_queue``."""

    has_model: bool = True  # False: no variant for this device class
    queue_depth: int = 0
    in_flight: int = 0
    concurrency: int = 1
    max_queue: int = 1 << 30
    service_ms: float | None = None  # typical local service time
    service_dev_ms: float = 0.0  # its typical deviation
    error_ms: float = 0.0  # how late local answers come against the queue model, on average
    error_dev_ms: float = 0.0  # that error's mean deviation
    running_ms: tuple[float, ...] = ()  # how long each run in flight has been going

    @property
    def saturated(self) -> bool:
        """A new request would be refused (every slot busy, the queue full)."""
        return self.in_flight >= self.concurrency and self.queue_depth >= self.max_queue


@dataclass(frozen=True)
class CloudState:
    available: bool = False  # connected and the breaker would let a call through
    serves_model: bool = True
    rtt_ms: float | None = None
    service_ms: float | None = None
    deviation_ms: float = 0.0  # running mean deviation of the whole round trip


@dataclass(frozen=True)
class RouteDecision:
    target: Target
    reason: str
    local_estimate_ms: float | None = None
    cloud_estimate_ms: float | None = None
    late: bool = False  # no path met the budget; run anyway (run-late)
    cascade: bool = False  # run locally, escalate to the cloud on low confidence


def service_periods(local: LocalState) -> float:
    """How many service times the queue model counts for a request arriving now: its
    own, plus the queue ahead of it and the runs in flight, per slot."""
    if local.in_flight >= local.concurrency or local.queue_depth > 0:
        return 2.0 + local.queue_depth / max(1, local.concurrency)
    return 1.0


def estimate_local_ms(local: LocalState, deviations: float = 0.0) -> float | None:
    """Queue wait plus service time; no wait while a slot is free. ``deviations``:
    mean deviations added to each service time (0: typical, else confident)."""
    if local.service_ms is None:
        return None
    service = local.service_ms + deviations * local.service_dev_ms
    model = service
    if local.in_flight >= local.concurrency or local.queue_depth > 0:
        running = local.running_ms
        if len(running) == local.in_flight:
            left = sum(max(0.0, service - elapsed) for elapsed in running)
        else:  # unknown progress: about one service time until a slot frees
            left = service
        model += (left + local.queue_depth * service) / max(1, local.concurrency)
    # Only ever later: an early answer must not talk the router out of a queue it sees.
    return model + max(0.0, local.error_ms) + deviations * local.error_dev_ms


def estimate_cloud_ms(cloud: CloudState, deviations: float = 0.0) -> float | None:
    if cloud.rtt_ms is None:
        return None
    return cloud.rtt_ms + (cloud.service_ms or 0.0) + deviations * cloud.deviation_ms


def _meets(estimate: float | None, budget_ms: float | None) -> bool:
    return budget_ms is None or estimate is None or estimate <= budget_ms


def decide(
    *,
    policy: RoutingPolicy,
    budget_ms: float | None,
    local: LocalState,
    cloud: CloudState,
    hints: LoadHints = LoadHints(),
    settings: RoutingSettings = RoutingSettings(),
    on_no_path: OnNoPath | None = None,
) -> RouteDecision:
    """Choose edge or cloud. Raises :class:`BudgetExceededError` (``refuse`` and no path
    meets the budget), :class:`CloudUnavailableError` (the cloud is required and down),
    :class:`CapacityError` (local queue full and no cloud)."""
    no_path = on_no_path or settings.on_no_path
    local_est, cloud_est = estimate_local_ms(local), estimate_cloud_ms(cloud)
    cloud_ok = cloud.available and cloud.serves_model
    local_ok = local.has_model and not local.saturated

    def made(
        target: Target, reason: str, *, late: bool = False, cascade: bool = False
    ) -> RouteDecision:
        return RouteDecision(target, reason, local_est, cloud_est, late=late, cascade=cascade)

    def no_path_left(why: str) -> RouteDecision:
        if no_path == "refuse":
            raise BudgetExceededError(
                f"no path meets the {budget_ms:.1f} ms budget ({why}; local estimate "
                f"{_fmt(local_est)}, cloud estimate {_fmt(cloud_est)})"
            )
        if local_ok:
            return made("edge", "no_path_run_late", late=True)
        if cloud_ok:
            return made("cloud", "no_path_run_late", late=True)
        return unreachable()

    def unreachable() -> RouteDecision:
        if not local.has_model:
            if not cloud.serves_model:
                raise UnknownModelError("no local variant, and the cloud does not serve the model")
            raise CloudUnavailableError("no local variant, and the cloud is unavailable")
        raise CapacityError(
            f"local queue is full ({local.queue_depth}/{local.max_queue} waiting) "
            "and the cloud is unavailable"
        )

    if policy == RoutingPolicy.LOCAL_ONLY:
        if not local.has_model:
            raise UnknownModelError("local-only: the model has no local variant on this device")
        if local.saturated:
            return unreachable()
        if _meets(local_est, budget_ms):
            return made("edge", "local_only")
        return no_path_left("local-only")

    if policy == RoutingPolicy.CLOUD_ONLY or not local.has_model:
        reason = "cloud_only" if policy == RoutingPolicy.CLOUD_ONLY else "no_local_variant"
        if not cloud_ok:
            if not cloud.serves_model:
                raise UnknownModelError(f"{reason}: the cloud does not serve this model")
            raise CloudUnavailableError(f"{reason}: the cloud is unavailable (breaker or link)")
        if _meets(cloud_est, budget_ms):
            return made("cloud", reason)
        if no_path == "refuse":
            return no_path_left(reason)
        return made("cloud", reason, late=True)

    if not local_ok:  # saturated: only the cloud can take it
        if cloud_ok:
            late = not _meets(cloud_est, budget_ms)
            if late and no_path == "refuse":
                return no_path_left("local queue full")
            return made("cloud", "local_saturated", late=late)
        return unreachable()

    if policy == RoutingPolicy.CASCADE:
        return made("edge", "cascade", cascade=True)

    # Confident estimates first; then the likelier of the paths whose typical estimate
    # meets the budget (see the module docstring).
    local_sure = estimate_local_ms(local, CONFIDENT_DEVIATIONS)
    cloud_sure = estimate_cloud_ms(cloud, CONFIDENT_DEVIATIONS)

    def likelier(preferred: Target) -> Target | None:
        local_may, cloud_may = (
            _meets(local_est, budget_ms),
            cloud_ok and _meets(cloud_est, budget_ms),
        )
        if local_may and cloud_may and local_sure is not None and cloud_sure is not None:
            return "edge" if local_sure <= cloud_sure else "cloud"
        if local_may and cloud_may:
            return preferred
        return "edge" if local_may else "cloud" if cloud_may else None

    if policy == RoutingPolicy.CLOUD_FIRST:
        if cloud_ok and _meets(cloud_sure, budget_ms):
            return made("cloud", "cloud_first")
        if _meets(local_sure, budget_ms):
            return made("edge", "cloud_unfit")
        target = likelier("cloud")
        if target is not None:
            return made(target, "cloud_first" if target == "cloud" else "cloud_unfit")
        return no_path_left("cloud-first")

    # local-first
    stress = hints.stressed(settings)
    if stress is not None and cloud_ok and _meets(cloud_est, budget_ms):
        return made("cloud", f"device_{stress}")
    if _meets(local_sure, budget_ms):
        return made("edge", "local_meets_budget")
    if cloud_ok and _meets(cloud_sure, budget_ms):
        return made("cloud", "local_misses_budget")
    target = likelier("edge")
    if target is not None:
        return made(target, "local_meets_budget" if target == "edge" else "local_misses_budget")
    return no_path_left("local-first")


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} ms"


# -- cascade -----------------------------------------------------------------------------------


def top1_confidence(scores: np.ndarray) -> float:
    """Top-1 confidence of the first row of ``scores``: taken as probabilities when they
    already are (non-negative, summing to 1), else softmaxed from logits."""
    row = (
        np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.ndim <= 1
        else (np.asarray(scores[0], dtype=np.float64).reshape(-1))
    )
    if row.size == 0 or not np.all(np.isfinite(row)):
        return 0.0
    if row.min() >= 0 and abs(row.sum() - 1.0) < 1e-3:
        return float(row.max())
    shifted = np.exp(row - row.max())
    return float(shifted.max() / shifted.sum())


def should_escalate(
    *,
    confidence: float,
    threshold: float,
    remaining_ms: float | None,
    cloud_estimate_ms: float | None,
    cloud_available: bool,
) -> bool:
    """Cascade: ask the cloud when the local answer is unsure and there is time left."""
    if not cloud_available or confidence >= threshold:
        return False
    if remaining_ms is None:
        return True
    if remaining_ms <= 0:
        return False
    return cloud_estimate_ms is None or cloud_estimate_ms <= remaining_ms


# -- execution ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalResult:
    outputs: dict[str, np.ndarray]
    version: int


@dataclass(frozen=True)
class CloudResult:
    outputs: dict[str, np.ndarray]
    version: int
    service_ms: float
    rtt_ms: float


class CloudPath(Protocol):
    """What the router needs from the cloud side (implemented by ``CloudClient``)."""

    def state(self, model: str) -> CloudState: ...

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float
    ) -> CloudResult: ...


@dataclass(frozen=True)
class RoutedResult:
    """What the router answers: where the request ran and whether it met its budget."""

    outputs: dict[str, np.ndarray]
    target: Target
    version: int
    latency_ms: float
    budget_ms: float | None
    reason: str
    late: bool = False
    escalated: bool = False  # cascade asked the cloud
    fell_back: bool = False  # the cloud failed; ran locally

    @property
    def met_budget(self) -> bool | None:
        return None if self.budget_ms is None else self.latency_ms <= self.budget_ms


@dataclass
class RoutingStats:
    """Counters for heartbeats: offload ratio, met-budget ratio. Thread-safe."""

    requests: int = 0
    cloud_requests: int = 0
    budgeted: int = 0
    met_budget: int = 0
    fallbacks: int = 0
    escalations: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, result: RoutedResult) -> None:
        with self._lock:
            self.requests += 1
            self.cloud_requests += result.target == "cloud"
            self.fallbacks += result.fell_back
            self.escalations += result.escalated
            if result.budget_ms is not None:
                self.budgeted += 1
                self.met_budget += bool(result.met_budget)

    @property
    def offload_ratio(self) -> float:
        return self.cloud_requests / self.requests if self.requests else 0.0

    @property
    def met_budget_ratio(self) -> float:
        return self.met_budget / self.budgeted if self.budgeted else 1.0


class _LocalError:
    """The queue model's last errors per service period (ms) for one model, with their
    median and confident quantile, recomputed every few answers (a sort per request
    would sit on the hot path). Not thread-safe: the router holds its lock."""

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=_ERROR_WINDOW)
        self.quantiles: tuple[float, float] | None = None  # (typical, sure), never < 0
        self._since_refresh = 0

    def add(self, error_ms: float) -> None:
        self.recent.append(error_ms)
        self._since_refresh += 1
        if self._since_refresh < _ERROR_REFRESH and len(self.recent) > 2 * _ERROR_REFRESH:
            return
        self._since_refresh = 0
        ordered = sorted(self.recent)
        typical = max(0.0, percentile(ordered, 50.0))
        self.quantiles = (typical, max(typical, percentile(ordered, 100.0 * _ERROR_QUANTILE)))


@dataclass(frozen=True)
class _Run:
    start: float
    budget: float | None
    decision: RouteDecision


class Router:
    """Executes routing decisions. ``run_local`` is the agent's local inference path."""

    def __init__(
        self,
        settings: RoutingSettings,
        cloud: CloudPath | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cloud = cloud
        self.stats = RoutingStats()
        self._clock = clock
        self._local_error: dict[str, _LocalError] = {}
        self._error_lock = threading.Lock()

    def route(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        run_local: Callable[[], LocalResult],
        *,
        local: LocalState,
        budget_ms: float | None = None,
        policy: RoutingPolicy | str | None = None,
        on_no_path: OnNoPath | None = None,
        hints: LoadHints = LoadHints(),
    ) -> RoutedResult:
        """Decide, then run. Raises what :func:`decide` raises, and cloud errors only when
        the cloud was the only path."""
        start = self._clock()
        budget = budget_ms if budget_ms is not None else self.settings.default_budget_ms
        chosen = RoutingPolicy(policy) if policy is not None else self.settings.policy
        cloud_state = self.cloud.state(model) if self.cloud is not None else CloudState()
        modelled = estimate_local_ms(local)
        periods = service_periods(local)
        with self._error_lock:
            if local.service_ms is None:  # no (or stale) figures: calibrate afresh too
                self._local_error.pop(model, None)
            calibration = self._local_error.get(model)
            error = calibration.quantiles if calibration is not None else None
        if error is not None:
            typical, sure = error[0] * periods, error[1] * periods
            # LocalState carries a typical error and a deviation that the confident
            # estimate multiplies by CONFIDENT_DEVIATIONS: chosen so it adds ``sure``.
            local = replace(
                local, error_ms=typical, error_dev_ms=(sure - typical) / CONFIDENT_DEVIATIONS
            )
        decision = decide(
            policy=chosen,
            budget_ms=budget,
            local=local,
            cloud=cloud_state,
            hints=hints,
            settings=self.settings,
            on_no_path=on_no_path,
        )
        run = _Run(start, budget, decision)

        if decision.target == "cloud":
            try:
                answer = self._ask_cloud(model, inputs, budget, self._spent_ms(start))
            except (CloudUnavailableError, BudgetExceededError) as exc:
                if chosen == RoutingPolicy.CLOUD_ONLY or not local.has_model:
                    raise
                self._refuse_late_fallback(run, local, on_no_path, exc)
                log.info("cloud failed for %s (%s); running locally", model, exc.code)
                fallback = run_local()
                return self._finish(run, fallback.outputs, "edge", fallback.version, fell_back=True)
            return self._finish(run, answer.outputs, "cloud", answer.version)

        result = run_local()
        if decision.cascade and self.cloud is not None:
            return self._cascade(model, inputs, result, run)
        finished = self._finish(run, result.outputs, "edge", result.version)
        if modelled is not None:
            bound = max(modelled, budget or 0.0)
            self._learn_local_error(model, finished.latency_ms - modelled, bound, periods)
        return finished

    def _learn_local_error(
        self, model: str, error_ms: float, bound_ms: float, periods: float
    ) -> None:
        """Calibrate the local queue model with how late (or early) an answer came, per
        service period it waited through. A sample is clipped to ``bound_ms`` (the
        request's budget or the model's estimate): one pause of the process must not
        shut the local path, which would then never run again to learn better."""
        error_ms = max(-bound_ms, min(error_ms, bound_ms)) / periods
        with self._error_lock:
            calibration = self._local_error.get(model)
            if calibration is None:
                calibration = self._local_error[model] = _LocalError()
            calibration.add(error_ms)

    def _cascade(
        self, model: str, inputs: Mapping[str, np.ndarray], local_result: LocalResult, run: _Run
    ) -> RoutedResult:
        assert self.cloud is not None
        name = self.settings.cascade_output or next(iter(local_result.outputs), None)
        scores = local_result.outputs.get(name) if name is not None else None
        confidence = top1_confidence(scores) if scores is not None else 1.0
        state = self.cloud.state(model)
        spent = self._spent_ms(run.start)
        remaining = None if run.budget is None else run.budget - spent
        if not should_escalate(
            confidence=confidence,
            threshold=self.settings.cascade_threshold,
            remaining_ms=remaining,
            cloud_estimate_ms=estimate_cloud_ms(state),
            cloud_available=state.available and state.serves_model,
        ):
            return self._finish(run, local_result.outputs, "edge", local_result.version)
        try:
            answer = self._ask_cloud(model, inputs, run.budget, spent)
        except (CloudUnavailableError, BudgetExceededError) as exc:
            log.info("cascade: cloud failed for %s (%s); keeping the local answer", model, exc.code)
            return self._finish(run, local_result.outputs, "edge", local_result.version)
        return self._finish(run, answer.outputs, "cloud", answer.version, escalated=True)

    def _refuse_late_fallback(
        self, run: _Run, local: LocalState, on_no_path: OnNoPath | None, exc: FoglineError
    ) -> None:
        """With ``refuse``, a fallback that cannot meet the budget left is refused."""
        if (on_no_path or self.settings.on_no_path) != "refuse" or run.budget is None:
            return
        left = run.budget - self._spent_ms(run.start)
        local_est = estimate_local_ms(local)
        if left <= 0 or (local_est is not None and local_est > left):
            raise BudgetExceededError(
                f"the cloud failed ({exc.code}) and running locally would miss the budget "
                f"({max(left, 0.0):.1f} ms left, local estimate {_fmt(local_est)})"
            ) from exc

    def _spent_ms(self, start: float) -> float:
        return (self._clock() - start) * 1000.0

    def _finish(
        self,
        run: _Run,
        outputs: dict[str, np.ndarray],
        target: Target,
        version: int,
        *,
        escalated: bool = False,
        fell_back: bool = False,
    ) -> RoutedResult:
        latency = self._spent_ms(run.start)
        late = run.decision.late or (run.budget is not None and latency > run.budget)
        result = RoutedResult(
            outputs,
            target,
            version,
            latency,
            run.budget,
            run.decision.reason,
            late=late,
            escalated=escalated,
            fell_back=fell_back,
        )
        self.stats.record(result)
        return result

    def _ask_cloud(
        self, model: str, inputs: Mapping[str, np.ndarray], budget: float | None, spent_ms: float
    ) -> CloudResult:
        if self.cloud is None:
            raise CloudUnavailableError("no cloud client is configured")
        if budget is None:
            timeout_ms = self.settings.cloud_timeout_ms
        else:
            timeout_ms = max(1.0, budget - spent_ms + self.settings.grace_ms)
        try:
            return self.cloud.infer(model, inputs, timeout_s=timeout_ms / 1000.0)
        except (CloudUnavailableError, BudgetExceededError):
            raise
        except FoglineError as exc:
            if isinstance(exc, UnknownModelError | CapacityError):
                raise CloudUnavailableError(f"cloud refused {model}: {exc.message}") from exc
            raise
