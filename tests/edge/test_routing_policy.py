"""Routing decisions and the router's execution, with fakes for both paths (pure, fast)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from fogline.edge import Admission
from fogline.edge._routing import (
    CloudResult,
    CloudState,
    LoadHints,
    LocalResult,
    LocalState,
    Router,
    RoutingPolicy,
    RoutingSettings,
    decide,
    estimate_cloud_ms,
    estimate_local_ms,
    service_periods,
    should_escalate,
    top1_confidence,
)
from fogline.protocol import (
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    ConfigError,
    UnknownModelError,
)

IDLE = LocalState(queue_depth=0, service_ms=5.0)
BUSY = LocalState(queue_depth=20, in_flight=1, concurrency=1, service_ms=5.0)  # ~110 ms
CLOUD = CloudState(available=True, rtt_ms=20.0, service_ms=2.0)  # 22 ms
DOWN = CloudState(available=False, rtt_ms=20.0, service_ms=2.0)


def test_estimates() -> None:
    assert estimate_local_ms(BUSY) == pytest.approx(110.0)
    assert estimate_local_ms(IDLE) == 5.0
    full = LocalState(queue_depth=4, in_flight=2, concurrency=2, service_ms=10)
    assert estimate_local_ms(full) == 35.0
    assert estimate_local_ms(LocalState()) is None
    assert estimate_cloud_ms(CLOUD) == 22.0
    assert estimate_cloud_ms(CloudState(available=True)) is None


def test_local_estimate_counts_what_is_left_of_the_runs_in_flight() -> None:
    # One slot, a run 15 ms into a 20 ms service: a new request waits 5 ms, not 20.
    half_done = LocalState(in_flight=1, concurrency=1, service_ms=20.0, running_ms=(15.0,))
    assert estimate_local_ms(half_done) == pytest.approx(25.0)
    # Overdue runs count as about to finish (never negative); the queue still counts.
    overdue = LocalState(queue_depth=1, in_flight=1, concurrency=1, service_ms=20.0,
                         running_ms=(35.0,))
    assert estimate_local_ms(overdue) == pytest.approx(40.0)
    # Two slots: the work ahead is shared by both.
    two = LocalState(in_flight=2, concurrency=2, service_ms=10.0, running_ms=(8.0, 4.0))
    assert estimate_local_ms(two) == pytest.approx((2.0 + 6.0) / 2 + 10.0)
    # The confident form adds the deviations to the service left as well.
    jitter = replace(half_done, service_dev_ms=2.0)
    assert estimate_local_ms(jitter, 2.0) == pytest.approx((24.0 - 15.0) + 24.0)
    # Without progress figures each run in flight counts a whole service time.
    assert estimate_local_ms(replace(half_done, running_ms=())) == pytest.approx(40.0)


def test_a_device_half_way_through_a_run_keeps_a_request_it_can_serve_in_time() -> None:
    busy = LocalState(in_flight=1, concurrency=1, service_ms=23.0, running_ms=(15.0,))
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=40, local=busy, cloud=CLOUD)
    assert d.target == "edge"
    just_started = replace(busy, running_ms=(1.0,))
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=40, local=just_started, cloud=CLOUD)
    assert d.target == "cloud"


def test_admission_reports_how_long_each_run_in_flight_has_been_going() -> None:
    adm = Admission(2, 0, 10.0)
    assert adm.running_ms() == ()
    adm.acquire(None)
    time.sleep(0.02)
    other = threading.Thread(target=adm.acquire, args=(None,))
    other.start()
    other.join()
    oldest, newest = adm.running_ms()
    assert oldest >= 20.0 > newest >= 0.0
    adm.release("m", 1.0, 1.0, True)
    assert len(adm.running_ms()) == 1


def test_local_first_stays_local_when_the_local_estimate_meets_the_budget() -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=IDLE, cloud=CLOUD)
    assert (d.target, d.reason, d.late) == ("edge", "local_meets_budget", False)


def test_local_first_offloads_when_the_local_queue_would_miss_the_budget() -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=BUSY, cloud=CLOUD)
    assert (d.target, d.reason) == ("cloud", "local_misses_budget")
    assert d.local_estimate_ms == pytest.approx(110.0)


def test_local_first_without_budget_stays_local() -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=None, local=BUSY, cloud=CLOUD)
    assert d.target == "edge"


def test_local_first_breaker_open_runs_late_locally() -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=BUSY, cloud=DOWN)
    assert (d.target, d.late, d.reason) == ("edge", True, "no_path_run_late")


def test_refuse_raises_budget_exceeded_at_once() -> None:
    with pytest.raises(BudgetExceededError, match=r"50\.0 ms budget"):
        decide(
            policy=RoutingPolicy.LOCAL_FIRST,
            budget_ms=50,
            local=BUSY,
            cloud=DOWN,
            on_no_path="refuse",
        )
    settings = RoutingSettings(on_no_path="refuse")
    slow_cloud = CloudState(available=True, rtt_ms=80, service_ms=5)
    with pytest.raises(BudgetExceededError):
        decide(
            policy=RoutingPolicy.LOCAL_FIRST,
            budget_ms=50,
            local=BUSY,
            cloud=slow_cloud,
            settings=settings,
        )


def test_unknown_local_estimate_counts_as_meeting_the_budget() -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=1, local=LocalState(), cloud=CLOUD)
    assert d.target == "edge"


@pytest.mark.parametrize(
    ("hints", "reason"),
    [
        (LoadHints(thermal="hot"), "device_thermal"),
        (LoadHints(battery=0.1), "device_low_battery"),
        (LoadHints(cpu_load=0.95), "device_cpu_load"),
    ],
)
def test_a_stressed_device_prefers_offloading(hints: LoadHints, reason: str) -> None:
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=IDLE, cloud=CLOUD, hints=hints)
    assert (d.target, d.reason) == ("cloud", reason)


def test_a_stressed_device_stays_local_when_the_cloud_is_down() -> None:
    d = decide(
        policy=RoutingPolicy.LOCAL_FIRST,
        budget_ms=50,
        local=IDLE,
        cloud=DOWN,
        hints=LoadHints(thermal="critical"),
    )
    assert d.target == "edge"


def test_cloud_first() -> None:
    first = RoutingPolicy.CLOUD_FIRST
    assert decide(policy=first, budget_ms=50, local=IDLE, cloud=CLOUD).target == "cloud"
    d = decide(policy=RoutingPolicy.CLOUD_FIRST, budget_ms=50, local=IDLE, cloud=DOWN)
    assert (d.target, d.reason) == ("edge", "cloud_unfit")
    slow = CloudState(available=True, rtt_ms=100)
    assert decide(policy=first, budget_ms=50, local=IDLE, cloud=slow).target == "edge"


def test_local_only_and_cloud_only() -> None:
    assert decide(policy=RoutingPolicy.LOCAL_ONLY, budget_ms=50, local=BUSY, cloud=CLOUD).late
    with pytest.raises(UnknownModelError):
        decide(
            policy=RoutingPolicy.LOCAL_ONLY,
            budget_ms=50,
            local=LocalState(has_model=False),
            cloud=CLOUD,
        )
    only = RoutingPolicy.CLOUD_ONLY
    assert decide(policy=only, budget_ms=50, local=IDLE, cloud=CLOUD).target == "cloud"
    with pytest.raises(CloudUnavailableError):
        decide(policy=RoutingPolicy.CLOUD_ONLY, budget_ms=50, local=IDLE, cloud=DOWN)
    slow = CloudState(available=True, rtt_ms=100)
    d = decide(policy=RoutingPolicy.CLOUD_ONLY, budget_ms=50, local=IDLE, cloud=slow)
    assert (d.target, d.late) == ("cloud", True)


@pytest.mark.parametrize("policy", list(RoutingPolicy.__members__.values()))
def test_no_local_variant_goes_to_the_cloud(policy: RoutingPolicy) -> None:
    no_variant = LocalState(has_model=False)
    if policy == RoutingPolicy.LOCAL_ONLY:
        with pytest.raises(UnknownModelError):
            decide(policy=policy, budget_ms=50, local=no_variant, cloud=CLOUD)
        return
    d = decide(policy=policy, budget_ms=50, local=no_variant, cloud=CLOUD)
    assert d.target == "cloud"
    with pytest.raises(CloudUnavailableError):
        decide(policy=policy, budget_ms=50, local=no_variant, cloud=DOWN)
    with pytest.raises(UnknownModelError):
        decide(
            policy=policy,
            budget_ms=50,
            local=no_variant,
            cloud=CloudState(available=True, serves_model=False),
        )


def test_saturated_local_offloads_or_refuses_for_capacity() -> None:
    full = LocalState(in_flight=4, concurrency=4, queue_depth=8, max_queue=8, service_ms=1)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=full, cloud=CLOUD)
    assert (d.target, d.reason) == ("cloud", "local_saturated")
    with pytest.raises(CapacityError):
        decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=full, cloud=DOWN)


def test_cascade_decision_runs_locally() -> None:
    d = decide(policy=RoutingPolicy.CASCADE, budget_ms=50, local=IDLE, cloud=CLOUD)
    assert (d.target, d.cascade) == ("edge", True)


def test_load_hints_from_the_agents_mapping() -> None:
    assert LoadHints.from_mapping({}) == LoadHints()
    hints = LoadHints.from_mapping({"cpu_load": 0.5, "battery": 0.1, "thermal": 0.8})
    assert (hints.cpu_load, hints.battery, hints.thermal) == (0.5, 0.1, "hot")
    assert LoadHints.from_mapping({"thermal": "critical"}).thermal == "critical"
    assert LoadHints.from_mapping({"thermal": "lava"}).thermal == "normal"


def test_policy_strings_and_bad_settings() -> None:
    assert RoutingPolicy("local-first") is RoutingPolicy.LOCAL_FIRST
    with pytest.raises(ValueError):
        RoutingPolicy("sideways")
    with pytest.raises(ValueError):
        RoutingSettings.model_validate({"policy": "local-first", "bogus": 1})
    with pytest.raises(ValueError):
        RoutingSettings.model_validate({"cascade_threshold": 2})
    assert ConfigError  # bad config surfaces as ConfigError in the agent's loader


def test_top1_confidence_from_logits_and_probabilities() -> None:
    assert top1_confidence(np.array([[0.1, 0.7, 0.2]], dtype=np.float32)) == pytest.approx(0.7)
    assert top1_confidence(np.array([[10.0, 0.0, 0.0]])) > 0.99
    assert top1_confidence(np.array([[0.0, 0.0]])) == pytest.approx(0.5)
    assert top1_confidence(np.array([np.nan, 1.0])) == 0.0
    assert top1_confidence(np.zeros((1, 0))) == 0.0


def test_should_escalate() -> None:
    kw = {"threshold": 0.8, "cloud_estimate_ms": 20.0, "cloud_available": True}
    assert should_escalate(confidence=0.5, remaining_ms=40, **kw)  # type: ignore[arg-type]
    assert not should_escalate(confidence=0.9, remaining_ms=40, **kw)  # type: ignore[arg-type]
    assert not should_escalate(confidence=0.5, remaining_ms=10, **kw)  # type: ignore[arg-type]
    assert should_escalate(confidence=0.5, remaining_ms=None, **kw)  # type: ignore[arg-type]
    assert not should_escalate(
        confidence=0.5, remaining_ms=40, threshold=0.8, cloud_estimate_ms=1, cloud_available=False
    )


# -- the router, with fake paths ------------------------------------------------------------------


class FakeCloud:
    def __init__(self, state: CloudState = CLOUD, fail: Exception | None = None) -> None:
        self._state = state
        self.fail = fail
        self.calls: list[float] = []

    def state(self, model: str) -> CloudState:
        return self._state

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float
    ) -> CloudResult:
        self.calls.append(timeout_s)
        if self.fail is not None:
            raise self.fail
        return CloudResult({"y": np.array([[0.0, 1.0]])}, version=7, service_ms=1.0, rtt_ms=3.0)


def local_answer(scores: list[float]) -> LocalResult:
    return LocalResult({"y": np.array([scores], dtype=np.float32)}, version=3)


def test_router_offloads_and_records_stats() -> None:
    cloud = FakeCloud()
    router = Router(RoutingSettings(default_budget_ms=50), cloud)
    res = router.route("m", {"x": np.zeros(1)}, lambda: local_answer([1, 0]), local=BUSY)
    assert (res.target, res.version, res.met_budget, res.late) == ("cloud", 7, True, False)
    assert cloud.calls and cloud.calls[0] <= (50 + 25) / 1000
    res = router.route("m", {"x": np.zeros(1)}, lambda: local_answer([1, 0]), local=IDLE)
    assert res.target == "edge"
    assert router.stats.offload_ratio == 0.5
    assert router.stats.met_budget_ratio == 1.0


def test_router_falls_back_locally_when_the_cloud_fails() -> None:
    cloud = FakeCloud(fail=CloudUnavailableError("timeout"))
    router = Router(RoutingSettings(), cloud)
    res = router.route("m", {}, lambda: local_answer([1, 0]), local=BUSY, budget_ms=50)
    assert (res.target, res.fell_back, res.version) == ("edge", True, 3)


def test_router_refuses_a_fallback_that_cannot_meet_the_budget_when_told_to() -> None:
    cloud = FakeCloud(fail=CloudUnavailableError("timeout"))
    ran: list[int] = []

    def run_local() -> LocalResult:
        ran.append(1)
        return local_answer([1, 0])

    router = Router(RoutingSettings(on_no_path="refuse"), cloud)
    # BUSY: the local estimate (~110 ms) is why the request went to the cloud.
    with pytest.raises(BudgetExceededError, match="running locally would miss"):
        router.route("m", {}, run_local, local=BUSY, budget_ms=50)
    assert not ran  # no local slot taken by a request that cannot make it
    # Per request, run-late still runs it locally, marked late.
    late = router.route("m", {}, run_local, local=BUSY, budget_ms=50, on_no_path="run-late")
    assert (late.target, late.fell_back) == ("edge", True)
    assert ran == [1]
    # A fallback that still fits the budget runs locally under refuse too.
    stressed = LoadHints(thermal="hot")  # offloaded for heat, though local would fit
    fits = router.route("m", {}, run_local, local=IDLE, budget_ms=50, hints=stressed)
    assert (fits.target, fits.fell_back) == ("edge", True)


def test_router_reraises_cloud_failure_for_cloud_only_or_no_variant() -> None:
    cloud = FakeCloud(fail=CloudUnavailableError("timeout"))
    router = Router(RoutingSettings(), cloud)
    with pytest.raises(CloudUnavailableError):
        router.route("m", {}, lambda: local_answer([1, 0]), local=IDLE, policy="cloud-only")
    with pytest.raises(CloudUnavailableError):
        router.route("m", {}, lambda: local_answer([1, 0]), local=LocalState(has_model=False))


def test_router_cascade_asks_the_cloud_only_for_low_confidence() -> None:
    cloud = FakeCloud()
    router = Router(RoutingSettings(policy=RoutingPolicy.CASCADE, cascade_threshold=0.8), cloud)
    sure = router.route("m", {}, lambda: local_answer([0.95, 0.05]), local=IDLE, budget_ms=100)
    assert (sure.target, sure.escalated) == ("edge", False)
    assert not cloud.calls
    unsure = router.route("m", {}, lambda: local_answer([0.55, 0.45]), local=IDLE, budget_ms=100)
    assert (unsure.target, unsure.escalated, unsure.version) == ("cloud", True, 7)
    assert len(cloud.calls) == 1
    cloud.fail = CloudUnavailableError("down")
    kept = router.route("m", {}, lambda: local_answer([0.55, 0.45]), local=IDLE, budget_ms=100)
    assert (kept.target, kept.version) == ("edge", 3)


def test_router_marks_late_results() -> None:
    ticks = iter([0.0, 0.2])
    router = Router(RoutingSettings(), None, clock=lambda: next(ticks))
    res = router.route("m", {}, lambda: local_answer([1, 0]), local=IDLE, budget_ms=50)
    assert (res.late, res.met_budget) == (True, False)
    assert router.stats.met_budget_ratio == 0.0


# -- confident and typical estimates ---------------------------------------------------------------


def test_a_jittery_local_path_offloads_when_the_cloud_surely_meets_the_budget() -> None:
    # Typical: a slot busy, none queued: 2 x 20 = 40 ms <= 50. Confident (3 deviations):
    # 2 x 35 = 70 ms.
    jittery = LocalState(in_flight=1, concurrency=1, service_ms=20.0, service_dev_ms=5.0)
    steady_cloud = CloudState(available=True, rtt_ms=20.0, service_ms=5.0, deviation_ms=2.0)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=jittery, cloud=steady_cloud)
    assert (d.target, d.reason) == ("cloud", "local_misses_budget")
    # Neither surely meets it: of the paths that meet it typically, the likelier one
    # (the lower confident estimate): local 70 ms against cloud 85 ms ...
    shaky_cloud = CloudState(available=True, rtt_ms=20.0, service_ms=5.0, deviation_ms=20.0)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=jittery, cloud=shaky_cloud)
    assert (d.target, d.reason) == ("edge", "local_meets_budget")
    # ... and local 70 ms against cloud 61 ms (typical 25: far more room than local's 40).
    wobbly_cloud = CloudState(available=True, rtt_ms=20.0, service_ms=5.0, deviation_ms=12.0)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=jittery, cloud=wobbly_cloud)
    assert (d.target, d.reason) == ("cloud", "local_misses_budget")
    # Only one path meets it even typically: that one.
    slow = LocalState(in_flight=1, concurrency=1, service_ms=30.0, service_dev_ms=5.0)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=slow, cloud=shaky_cloud)
    assert d.target == "cloud"
    # A steady local path that surely meets it stays local.
    steady = LocalState(in_flight=1, concurrency=1, service_ms=20.0, service_dev_ms=1.0)
    d = decide(policy=RoutingPolicy.LOCAL_FIRST, budget_ms=50, local=steady, cloud=steady_cloud)
    assert d.target == "edge"


def test_confident_estimates_add_deviations_to_each_service_time() -> None:
    local = LocalState(queue_depth=1, in_flight=1, concurrency=1, service_ms=10.0,
                       service_dev_ms=2.0)
    assert estimate_local_ms(local) == pytest.approx(30.0)
    assert estimate_local_ms(local, 2.0) == pytest.approx(42.0)  # 3 x (10 + 2 x 2)
    cloud = CloudState(available=True, rtt_ms=20.0, service_ms=5.0, deviation_ms=3.0)
    assert estimate_cloud_ms(cloud) == pytest.approx(25.0)
    assert estimate_cloud_ms(cloud, 2.0) == pytest.approx(31.0)


def test_admission_routing_estimate_is_robust_and_goes_stale() -> None:

    steady, jittery = Admission(1, 0, 10.0), Admission(1, 0, 10.0)
    for i in range(40):
        for adm, service in ((steady, 10.0), (jittery, 10.0 if i % 2 else 30.0)):
            adm.acquire(None)
            adm.release("m", service, service, True)
    assert steady.routing_estimate("m") == (10.0, 0.0)
    median, deviation = jittery.routing_estimate("m")
    assert median == pytest.approx(20.0) and deviation == pytest.approx(10.0)
    assert jittery.routing_estimate("unknown") == (None, 0.0)
    # One very slow run does not move it (an average would carry it for long).
    steady.acquire(None)
    steady.release("m", 900.0, 900.0, True)
    assert steady.routing_estimate("m") == (10.0, 0.0)
    # Stale while idle: unknown, so the next request runs and measures again.
    steady.stale_s = 0.0
    assert steady.routing_estimate("m") == (None, 0.0)


def test_router_calibrates_the_local_queue_model_with_observed_latency() -> None:
    now = [0.0]
    cloud = FakeCloud()
    router = Router(RoutingSettings(), cloud, clock=lambda: now[0])

    def slow_local() -> LocalResult:  # the model says 5 ms (IDLE); answers take 30 ms
        now[0] += 0.030
        return local_answer([1, 0])

    first = router.route("m", {}, slow_local, local=IDLE, budget_ms=40)
    assert first.target == "edge"  # the model alone: 5 ms, well within 40 ms
    for _ in range(30):
        router.route("m", {}, slow_local, local=IDLE, budget_ms=200)
    # Calibrated: ~30 ms, so a 25 ms budget goes to the cloud (22 ms), 40 ms stays local.
    assert router.route("m", {}, slow_local, local=IDLE, budget_ms=40).target == "edge"
    assert router.route("m", {}, slow_local, local=IDLE, budget_ms=25).target == "cloud"
    assert not cloud.calls[:-1]  # only that last request was offloaded


def test_local_calibration_starts_afresh_when_the_local_figures_go_stale() -> None:
    now = [0.0]
    router = Router(RoutingSettings(on_no_path="refuse"), None, clock=lambda: now[0])

    def paused_local() -> LocalResult:  # every answer 100 ms late (a long pause)
        now[0] += 0.105
        return local_answer([1, 0])

    for _ in range(30):
        router.route("m", {}, paused_local, local=IDLE, budget_ms=200)
    with pytest.raises(BudgetExceededError):  # calibrated: local misses, no cloud
        router.route("m", {}, paused_local, local=IDLE, budget_ms=30)
    # Idle long enough that admission forgot its figures: unknown, so it runs and
    # measures again, and the old calibration is gone with them.
    unknown = LocalState(service_ms=None)
    assert router.route("m", {}, lambda: local_answer([1, 0]), local=unknown,
                        budget_ms=30).target == "edge"
    assert router.route("m", {}, lambda: local_answer([1, 0]), local=IDLE,
                        budget_ms=30).target == "edge"


def test_local_calibration_covers_the_tail_and_ignores_one_outlier() -> None:
    now = [0.0]
    cloud = FakeCloud()
    router = Router(RoutingSettings(), cloud, clock=lambda: now[0])
    lateness = iter([0.0] * 9 + [0.020])  # one answer in ten comes 20 ms late

    def jittery_local() -> LocalResult:
        now[0] += 0.005 + next(lateness, 0.0)
        return local_answer([1, 0])

    for _ in range(10):
        lateness = iter([0.0] * 9 + [0.020])
        for _ in range(10):
            router.route("m", {}, jittery_local, local=IDLE, budget_ms=200)
    # Typically on time (5 ms), but surely only within 25 ms: a 24 ms budget is no
    # sure thing locally, so it goes to the cloud (sure within 22 ms), a 30 ms one stays.
    cloud.calls.clear()
    assert router.route("m", {}, lambda: local_answer([1, 0]), local=IDLE,
                        budget_ms=30).target == "edge"
    assert router.route("m", {}, lambda: local_answer([1, 0]), local=IDLE,
                        budget_ms=24).target == "cloud"
    # One pause among steady answers moves neither quantile for good.
    steady = Router(RoutingSettings(), FakeCloud(), clock=lambda: now[0])
    lateness = iter([0.0] * 60 + [0.150] + [0.0] * 60)
    for _ in range(121):
        steady.route("m", {}, jittery_local, local=IDLE, budget_ms=200)
    assert steady.route("m", {}, lambda: local_answer([1, 0]), local=IDLE,
                        budget_ms=8).target == "edge"


def test_local_calibration_scales_with_the_queue_ahead() -> None:
    now = [0.0]
    router = Router(RoutingSettings(on_no_path="refuse"), None, clock=lambda: now[0])

    def late_local() -> LocalResult:  # every answer 2 ms later than the model says
        now[0] += 0.007
        return local_answer([1, 0])

    for _ in range(40):
        router.route("m", {}, late_local, local=IDLE, budget_ms=200)
    # 2 ms per service period: with 4 queued behind one in flight (6 periods, 30 ms
    # modelled), a request is expected 12 ms late: 42 ms, over a 40 ms budget.
    queued = LocalState(queue_depth=4, in_flight=1, concurrency=1, service_ms=5.0)
    assert service_periods(queued) == 6.0 and service_periods(IDLE) == 1.0
    with pytest.raises(BudgetExceededError):
        router.route("m", {}, late_local, local=queued, budget_ms=40)
    assert router.route("m", {}, late_local, local=queued, budget_ms=45).target == "edge"
