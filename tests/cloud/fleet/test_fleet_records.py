"""Unit tests of the pure parts: folding messages into records, and the summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fogline.cloud.fleet import (
    AttentionThresholds,
    DeviceRecord,
    apply_event,
    apply_heartbeat,
    apply_state,
    mark_offline,
    summarize,
)
from fogline.protocol import DeviceEvent, DeviceState, Heartbeat

HB = Callable[..., Heartbeat]


def _fold(hb_factory: HB, *beats: dict[str, Any]) -> DeviceRecord:
    record = None
    for i, fields in enumerate(beats, start=1):
        fields = {"seq": i, "uptime_s": float(i), "at": 1000.0 + i, **fields}
        record = apply_heartbeat(
            record, hb_factory(fields.pop("device_id", "d1"), **fields), 100.0 + i
        )
    assert record is not None
    return record


def test_counter_deltas_and_recent_window(heartbeat_factory: HB) -> None:
    r = _fold(heartbeat_factory, {"requests": 10, "errors": 1}, {"requests": 25, "errors": 1})
    assert r.totals.requests == 25 and r.totals.errors == 1
    assert r.recent is not None and (r.recent.requests, r.recent.errors) == (15, 0)
    assert r.recent.seconds == 1.0 and r.recent.request_rate == 15.0
    assert r.heartbeats == 2 and r.first_seen == 101.0 and r.last_alive_at == 102.0


def test_agent_restart_keeps_totals_monotonic(heartbeat_factory: HB) -> None:
    r = _fold(
        heartbeat_factory,
        {"requests": 100, "uptime_s": 50.0},
        {"requests": 120, "uptime_s": 60.0},
        {"requests": 5, "uptime_s": 2.0, "seq": 1},  # restarted: counters from zero
    )
    assert r.totals.requests == 125
    assert r.recent is not None and r.recent.requests == 5 and r.recent.seconds == 2.0


def test_duplicate_and_out_of_order_heartbeats_count_once(heartbeat_factory: HB) -> None:
    first = heartbeat_factory("d1", 1, requests=10, uptime_s=1.0, at=1001.0)
    second = heartbeat_factory("d1", 2, requests=20, uptime_s=2.0, at=1002.0)
    r = apply_heartbeat(None, first, 1.0)
    r = apply_heartbeat(r, second, 2.0)
    r = apply_heartbeat(r, second, 3.0)  # QoS 1 redelivery
    r = apply_heartbeat(r, first, 4.0)  # late, from another replica
    assert r.totals.requests == 20
    assert r.heartbeat == second and r.last_alive_at == 4.0


def test_online_offline_transitions(heartbeat_factory: HB) -> None:
    online = DeviceState(
        device_id="d1",
        status="online",
        at=1.0,
        device_class="rpi4",
        groups=["lab"],
        agent_version="1.2",
    )
    r = apply_state(None, online, 10.0)
    assert r.online and r.status_reason == "online_state" and r.groups == ["lab"]
    r = apply_state(r, DeviceState(device_id="d1", status="offline", at=2.0), 20.0)
    assert not r.online and r.status_reason == "last_will" and r.status_since == 20.0
    assert r.device_class == "rpi4"  # an offline will without details keeps them
    event = DeviceEvent(device_id="d1", kind="agent_stopping", at=3.0)
    r = apply_event(r, event, 25.0)
    assert not r.online and r.last_seen == 25.0  # events do not prove liveness
    r = apply_heartbeat(r, heartbeat_factory("d1"), 30.0)
    assert r.online and r.status_reason == "heartbeat" and r.status_since == 30.0
    r = mark_offline(r, "missed_heartbeats", 40.0)
    assert mark_offline(r, "last_will", 50.0) == r  # already offline: unchanged
    assert r.status_reason == "missed_heartbeats"


def _device(hb_factory: HB, device_id: str, online: bool = True, **fields: Any) -> DeviceRecord:
    r = _fold(hb_factory, {"device_id": device_id, **fields})
    return r if online else mark_offline(r, "last_will", 200.0)


def test_summary_figures(heartbeat_factory: HB) -> None:
    devices = [
        _device(
            heartbeat_factory,
            "a",
            requests=100,
            edge_requests=80,
            cloud_requests=20,
            budgeted_requests=50,
            met_budget=45,
            errors=0,
            latency_p50_ms=4.0,
            latency_p99_ms=30.0,
            models={"digits": 3},
        ),
        _device(
            heartbeat_factory,
            "b",
            requests=50,
            edge_requests=50,
            errors=0,
            latency_p50_ms=8.0,
            latency_p99_ms=60.0,
            models={"digits": 3},
        ),
        _device(
            heartbeat_factory,
            "c",
            requests=10,
            edge_requests=10,
            errors=0,
            latency_p50_ms=6.0,
            latency_p99_ms=10.0,
            models={"digits": 3},
        ),
        _device(
            heartbeat_factory,
            "gone",
            online=False,
            requests=40,
            edge_requests=40,
            latency_p50_ms=500.0,
            latency_p99_ms=900.0,
            models={"digits": 2},
        ),
    ]
    s = summarize(devices, now=123.0)
    assert (s.devices_total, s.devices_online, s.devices_offline) == (4, 3, 1)
    assert s.generated_at == 123.0
    assert s.requests_total == 200
    assert s.offload_ratio == pytest.approx(20 / 200)
    assert s.met_budget_share == pytest.approx(45 / 50)
    assert s.error_rate == 0.0
    # Online devices only: median of p50s, max of p99s, rate over the last window.
    assert s.latency_p50_ms == 6.0 and s.latency_p99_ms == 60.0
    assert s.request_rate_per_s == pytest.approx(160.0)  # first heartbeats: counts / uptime 1 s
    [model] = s.models
    assert model.versions == {2: 1, 3: 3} and model.devices_behind == 1
    assert {a.device_id: a.reasons for a in s.attention} == {"gone": ["offline", "version_behind"]}


def test_attention_reasons(heartbeat_factory: HB) -> None:
    devices = [
        _fold(
            heartbeat_factory,
            {"device_id": "err", "requests": 10},
            {"device_id": "err", "requests": 20, "errors": 3},
        ),
        _device(heartbeat_factory, "slow", requests=5, latency_p99_ms=400.0),
        _device(heartbeat_factory, "breaker", breaker_state="open"),
        _device(heartbeat_factory, "lossy", telemetry_dropped=7),
        _device(heartbeat_factory, "fine", requests=5, latency_p99_ms=10.0),
    ]
    s = summarize(devices, thresholds=AttentionThresholds(p99_high_ms=250.0))
    assert {a.device_id: a.reasons for a in s.attention} == {
        "err": ["errors_rising"],
        "slow": ["p99_high"],
        "breaker": ["breaker_open"],
        "lossy": ["telemetry_dropped"],
    }
    assert s.attention_counts()["p99_high"] == 1
    relaxed = summarize(devices, thresholds=AttentionThresholds(p99_high_ms=500, error_share=0.5))
    assert {a.device_id for a in relaxed.attention} == {"breaker", "lossy"}


def test_empty_fleet_summary() -> None:
    s = summarize([])
    assert s.devices_total == 0 and s.models == [] and s.attention == []
    assert s.latency_p50_ms is None and s.offload_ratio is None and s.error_rate is None
