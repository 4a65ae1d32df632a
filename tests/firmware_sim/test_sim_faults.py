"""The fault injector and the control channel, against a recording target.

The real fleet is the target in test_sim_fleet.py; here a recorder checks the timing
logic (scenario order, undo after a duration, flaps) and the control protocol.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fogline.firmware_sim import (
    ControlServer,
    FaultInjector,
    FaultKind,
    FlapProfile,
    parse_scenario,
    send_control,
)
from fogline.protocol import ConfigError, FoglineError, TransportError


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[FaultKind, str]] = []
        self.changed = threading.Condition()

    def device_profiles(self) -> Mapping[str, str]:
        return {"d-0": "rpi4", "d-1": "rpi4", "d-2": "jetson-like"}

    def apply_fault(
        self,
        kind: FaultKind,
        device_id: str,
        *,
        extra_latency_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
    ) -> None:
        if device_id == "d-2" and kind == "kill":
            raise FoglineError("cannot kill this one")
        with self.changed:
            self.calls.append((kind, device_id))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[FaultKind, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.calls) >= count, timeout)
            return list(self.calls)


def test_scenario_faults_fire_in_order_and_undo_after_their_duration() -> None:
    target = Recorder()
    scenario = parse_scenario(
        {
            "faults": [
                {"at": 0.2, "kind": "slow_link", "device": "d-1", "extra_latency_ms": 100},
                {"at": 0.0, "kind": "disconnect", "device": "d-0", "duration_s": 0.3},
                {"at": 0.1, "kind": "kill", "device": "d-2"},
            ]
        }
    )
    injector = FaultInjector(target, seed=0)
    try:
        injector.start(scenario)
        calls = target.wait_for(3)
    finally:
        injector.stop()
    assert calls[:3] == [("disconnect", "d-0"), ("slow_link", "d-1"), ("reconnect", "d-0")]
    failed = [r for r in injector.history if not r.ok]
    assert [(r.kind, r.device_id, r.detail) for r in failed] == [
        ("kill", "d-2", "cannot kill this one")
    ]
    assert all(r.source == "scenario" for r in injector.history)


def test_a_scenario_with_unknown_targets_fails_before_anything_runs() -> None:
    target = Recorder()
    scenario = parse_scenario({"faults": [{"at": 0, "kind": "kill", "device": "d-9"}]})
    injector = FaultInjector(target)
    with pytest.raises(ConfigError, match="unknown device"):
        injector.start(scenario)
    injector.stop()
    assert target.calls == []


def test_flaps_disconnect_and_reconnect_repeatedly() -> None:
    target = Recorder()
    injector = FaultInjector(target, seed=3)
    try:
        # A flap every ~36 ms, down ~10 ms: several cycles within a fraction of a second.
        injector.start(flaps={"d-0": FlapProfile(per_hour=100_000, mean_down_s=0.01)})
        calls = target.wait_for(6)
    finally:
        injector.stop()
    kinds = [kind for kind, _ in calls[:6]]
    assert kinds == ["disconnect", "reconnect"] * 3
    assert all(r.source == "flap" for r in injector.history)


def test_inject_now_validates_and_schedules_the_undo() -> None:
    target = Recorder()
    injector = FaultInjector(target)
    try:
        injector.start()
        with pytest.raises(FoglineError, match="unknown simulated device"):
            injector.inject("kill", "nobody")
        with pytest.raises(FoglineError, match="takes no duration"):
            injector.inject("restart", "d-0", duration_s=1.0)
        record = injector.inject("kill", "d-1", duration_s=0.05, source="cli")
        assert record.ok
        calls = target.wait_for(2)
    finally:
        injector.stop()
    assert calls == [("kill", "d-1"), ("restart", "d-1")]


def test_control_channel_round_trip_and_bad_requests(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        seen.append(request)
        if request.get("op") == "boom":
            raise FoglineError("no such op")
        if request.get("op") == "crash":
            raise RuntimeError("bug")
        return {"ok": True, "echo": request}

    server = ControlServer(tmp_path, handler)
    server.start()
    try:
        assert (tmp_path / "control.json").exists()
        reply = send_control(tmp_path, {"op": "devices"})
        assert reply == {"ok": True, "echo": {"op": "devices"}}
        assert send_control(tmp_path, {"op": "boom"})["error"]["code"] == "fogline_error"
        assert send_control(tmp_path, {"op": "crash"})["error"]["code"] == "internal_error"
        address = server.address
        assert address is not None
        for garbage in (b"not json\n", b"[1, 2]\n", b"\xff\xfe\n"):
            with socket.create_connection(address, timeout=5) as sock:
                sock.sendall(garbage)
                assert b'"bad_request"' in sock.makefile("rb").readline()
        # The server keeps serving after garbage.
        assert send_control(tmp_path, {"op": "devices"})["ok"] is True
    finally:
        server.stop()
    assert not (tmp_path / "control.json").exists()
    with pytest.raises(ConfigError, match="no running simulation"):
        send_control(tmp_path, {"op": "devices"})


def test_a_stale_control_file_is_a_transport_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "control.json").write_text(f'{{"host": "127.0.0.1", "port": {port}, "pid": 1}}')
    with pytest.raises(TransportError, match="did not answer"):
        send_control(tmp_path, {"op": "devices"}, timeout=2.0)
    (tmp_path / "control.json").write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        send_control(tmp_path, {"op": "devices"})


def test_stop_is_prompt_with_faults_far_in_the_future() -> None:
    target = Recorder()
    injector = FaultInjector(target)
    injector.start(parse_scenario({"faults": [{"at": 3600, "kind": "kill", "device": "d-0"}]}))
    started = time.monotonic()
    injector.stop()
    assert time.monotonic() - started < 5
    assert target.calls == []
