"""The fogline-sim CLI: profiles, a short run against a real Mosquitto, and faults
sent to a simulation that is not running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fogline.firmware_sim.cli import app, parse_mix
from fogline.protocol import ConfigError

runner = CliRunner()


def test_profiles_json_lists_the_builtin_profiles() -> None:
    result = runner.invoke(app, ["profiles", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rpi4"]["device_class"] == "cpu-1t"
    assert runner.invoke(app, ["profiles"]).exit_code == 0


def test_profile_mix_parsing() -> None:
    assert parse_mix("rpi4=0.6, jetson-like=0.4") == {"rpi4": 0.6, "jetson-like": 0.4}
    assert parse_mix("rpi4") == {"rpi4": 1.0}
    with pytest.raises(ConfigError):
        parse_mix("rpi4=lots")
    with pytest.raises(ConfigError):
        parse_mix(",")


def test_a_short_run_prints_its_report_as_json(broker_url: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            "-n",
            "2",
            "--profile-mix",
            "rpi4=1",
            "--duration",
            "1",
            "--settle",
            "0",
            "--rate",
            "5",
            "--broker",
            broker_url,
            "--data-root",
            str(tmp_path / "sim"),
            "--topic-prefix",
            "fogline-simcli/x",
            "--no-flaps",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["devices"] == 2
    assert report["running"] == 0
    # No release was published: every request is an unknown model, counted, not lost.
    assert report["sent"] == report["answered"] + report["errors"]
    assert set(report["error_codes"]) <= {"unknown_model"}


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--profile-mix", "pentium=1", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "config_error"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[faults]]\nat = -1\n")
    result = runner.invoke(app, ["run", "--scenario", str(bad), "--json"])
    assert result.exit_code == 1
    assert "faults.0" in json.loads(result.stdout)["error"]["message"]
    result = runner.invoke(
        app, ["fault", "kill", "sim-0001", "--data-root", str(tmp_path), "--json"]
    )
    assert result.exit_code == 1
    assert "no running simulation" in json.loads(result.stdout)["error"]["message"]
