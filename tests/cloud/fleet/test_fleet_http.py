"""The metrics endpoint and the web page, scraped over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fogline.cloud.fleet import (
    AttentionItem,
    FleetMonitor,
    FleetStore,
    FleetWebServer,
    Observed,
    render_html,
    summarize,
)
from fogline.protocol import DeviceState, FleetError, Heartbeat

HB = Callable[..., Heartbeat]


@pytest.fixture
def web(fleet_store: FleetStore) -> Iterator[FleetWebServer]:
    server = FleetWebServer(fleet_store, port=0)
    server.start()
    try:
        yield server
    finally:
        server.close()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _fill(store: FleetStore, hb: HB) -> None:
    store.apply(
        [
            Observed(
                hb(
                    "a",
                    requests=100,
                    edge_requests=75,
                    cloud_requests=25,
                    budgeted_requests=10,
                    met_budget=9,
                    errors=2,
                    latency_p50_ms=5.0,
                    latency_p99_ms=40.0,
                    models={"digits": 2},
                ),
                1.0,
            ),
            Observed(
                hb(
                    "b",
                    requests=20,
                    edge_requests=20,
                    latency_p50_ms=7.0,
                    latency_p99_ms=300.0,
                    models={"digits": 1},
                ),
                1.0,
            ),
            Observed(DeviceState(device_id="c", status="offline", at=1.0), 1.0),
        ]
    )


def test_metrics_endpoint(
    web: FleetWebServer, fleet_store: FleetStore, heartbeat_factory: HB
) -> None:
    _fill(fleet_store, heartbeat_factory)
    status, ctype, text = _get(f"{web.url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    m = _samples(text)
    assert m[("fogline_devices", (("state", "online"),))] == 2
    assert m[("fogline_devices", (("state", "offline"),))] == 1
    assert m[("fogline_model_devices", (("model", "digits"), ("version", "2")))] == 1
    assert m[("fogline_model_devices", (("model", "digits"), ("version", "1")))] == 1
    assert m[("fogline_model_latest_version", (("model", "digits"),))] == 2
    assert m[("fogline_model_devices_behind", (("model", "digits"),))] == 1
    assert m[("fogline_requests_total", ())] == 120
    assert m[("fogline_requests_by_path_total", (("path", "cloud"),))] == 25
    assert m[("fogline_request_errors_total", ())] == 2
    assert m[("fogline_request_latency_p99_seconds", ())] == pytest.approx(0.3)
    assert m[("fogline_request_latency_p50_seconds", ())] == pytest.approx(0.006)
    assert m[("fogline_offload_ratio", ())] == pytest.approx(25 / 120)
    assert m[("fogline_met_budget_ratio", ())] == pytest.approx(0.9)
    assert m[("fogline_devices_attention", (("reason", "offline"),))] == 1
    assert m[("fogline_devices_attention", (("reason", "p99_high"),))] == 1
    assert m[("fogline_devices_attention", (("reason", "version_behind"),))] == 1


def test_empty_fleet_metrics_leave_unknowns_out(web: FleetWebServer) -> None:
    m = _samples(_get(f"{web.url}/metrics")[2])
    assert m[("fogline_devices", (("state", "online"),))] == 0
    assert ("fogline_offload_ratio", ()) not in m  # unknown, not zero


def test_page_json_and_unknown_paths(
    web: FleetWebServer, fleet_store: FleetStore, heartbeat_factory: HB
) -> None:
    _fill(fleet_store, heartbeat_factory)
    status, ctype, page = _get(f"{web.url}/")
    assert status == 200 and ctype.startswith("text/html")
    assert 'http-equiv="refresh"' in page and "Needs attention" in page and "digits" in page
    summary: dict[str, Any] = json.loads(_get(f"{web.url}/api/summary")[2])
    assert summary["devices_total"] == 3 and summary["requests_total"] == 120
    devices = json.loads(_get(f"{web.url}/api/devices")[2])
    assert sorted(d["device_id"] for d in devices) == ["a", "b", "c"]

    def ids(query: str) -> list[str]:
        return sorted(d["device_id"] for d in json.loads(_get(f"{web.url}/api/devices?{query}")[2]))

    assert ids("model=digits:1") == ["b"] and ids("model=digits") == ["a", "b"]
    assert ids("offline=1") == ["c"] and ids("class=rpi4&model=digits:2") == ["a"]
    for bad in ("model=digits:x", "colour=red"):
        status, _, text = _get(f"{web.url}/api/devices?{bad}")
        assert status == 400 and text.strip()
    assert _get(f"{web.url}/healthz")[:1] == (200,)
    assert _get(f"{web.url}/nope")[0] == 404


def test_monitor_stats_are_exported(fleet_store: FleetStore, mqtt_settings: Any) -> None:
    monitor = FleetMonitor(mqtt_settings, fleet_store)  # not started: stats are all zero
    with FleetWebServer(fleet_store, port=0, stats=monitor.stats) as server:
        m = _samples(_get(f"{server.url}/metrics")[2])
    assert m[("fogline_fleet_messages_applied_total", ())] == 0
    assert m[("fogline_fleet_queue_depth", ())] == 0


def test_port_in_use_is_a_clear_error(web: FleetWebServer, fleet_store: FleetStore) -> None:
    port = int(web.url.rsplit(":", 1)[1])
    with pytest.raises(FleetError, match=f"127.0.0.1:{port}"):
        FleetWebServer(fleet_store, port=port)


def test_page_escapes_what_it_shows() -> None:
    summary = summarize([]).model_copy(
        update={"attention": [AttentionItem(device_id="<b>", reasons=["offline"], detail="&")]}
    )
    page = render_html(summary)
    assert "&lt;b&gt;" in page and "<b>" not in page and "&amp;" in page
