"""Scenario files: parsing, validation errors and target resolution."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fogline.firmware_sim import load_scenario, parse_scenario, resolve_targets
from fogline.protocol import ConfigError

DEVICES = {
    "sim-0000": "rpi4",
    "sim-0001": "rpi4",
    "sim-0002": "jetson-like",
    "sim-0003": "mcu-gateway",
}


def test_a_scenario_file_parses_into_a_timeline(tmp_path: Path) -> None:
    path = tmp_path / "flaky.toml"
    path.write_text(
        """
name = "flaky"
[[faults]]
at = 8.0
kind = "slow_link"
device = "sim-0001"
extra_latency_ms = 300.0
bandwidth_kbps = 64.0
duration_s = 10.0

[[faults]]
at = 5.0
kind = "disconnect"
random = 2
profile = "rpi4"
duration_s = 4.0

[[faults]]
at = 6.0
kind = "kill"
devices = ["sim-0002"]

[[faults]]
at = 9.0
kind = "restart"
devices = ["sim-0002"]
"""
    )
    scenario = load_scenario(path)
    assert scenario.name == "flaky"
    assert [f.at for f in scenario.timeline()] == [5.0, 6.0, 8.0, 9.0]
    rng = random.Random(0)
    first = scenario.timeline()[0]
    assert resolve_targets(first, DEVICES, rng) == ["sim-0000", "sim-0001"]
    assert resolve_targets(scenario.timeline()[1], DEVICES, rng) == ["sim-0002"]


def test_all_targets_every_device_or_every_device_of_a_profile() -> None:
    scenario = parse_scenario(
        {
            "faults": [
                {"at": 0, "kind": "kill", "all": True},
                {"at": 1, "kind": "restart", "all": True, "profile": "rpi4"},
            ]
        }
    )
    rng = random.Random(0)
    assert resolve_targets(scenario.faults[0], DEVICES, rng) == sorted(DEVICES)
    assert resolve_targets(scenario.faults[1], DEVICES, rng) == ["sim-0000", "sim-0001"]


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"at": -1, "kind": "kill", "device": "sim-0000"}, "faults.0.at"),
        ({"at": 1, "kind": "explode", "device": "sim-0000"}, "faults.0.kind"),
        ({"at": 1, "kind": "kill"}, "exactly one target"),
        ({"at": 1, "kind": "kill", "device": "sim-0000", "random": 1}, "exactly one target"),
        ({"at": 1, "kind": "kill", "device": "a/b"}, "faults.0.device"),
        ({"at": 1, "kind": "restart", "device": "sim-0000", "duration_s": 3}, "duration_s"),
        ({"at": 1, "kind": "slow_link", "device": "sim-0000"}, "slow_link needs"),
        ({"at": 1, "kind": "kill", "device": "sim-0000", "extra_latency_ms": 5}, "slow_link only"),
        ({"at": 1, "kind": "kill", "device": "sim-0000", "profile": "rpi4"}, "profile filters"),
        ({"at": 1, "kind": "kill", "device": "sim-0000", "when": 3}, "faults.0.when"),
        ({"at": 1, "kind": "kill", "random": 0}, "faults.0.random"),
    ],
)
def test_bad_faults_are_one_config_error_naming_the_field(
    fault: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario({"faults": [fault]}, "s.toml")
    assert field in info.value.message
    assert "s.toml" in info.value.message


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"at": 1, "kind": "kill", "device": "sim-9999"}, "unknown device"),
        ({"at": 1, "kind": "kill", "random": 3, "profile": "rpi4"}, "asks for 3 devices, 2 match"),
        ({"at": 1, "kind": "kill", "all": True, "profile": "nuc"}, "no device has profile 'nuc'"),
    ],
)
def test_targets_that_do_not_exist_are_config_errors(fault: dict[str, object], field: str) -> None:
    spec = parse_scenario({"faults": [fault]}).faults[0]
    with pytest.raises(ConfigError, match=field):
        resolve_targets(spec, DEVICES, random.Random(0))


def test_unreadable_scenarios_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_scenario(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[faults]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)
    extra = tmp_path / "extra.toml"
    extra.write_text("duration = 3\n")
    with pytest.raises(ConfigError, match="'duration'"):
        load_scenario(extra)
