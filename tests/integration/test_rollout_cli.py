"""``fogline model publish --wait``: a rollout followed to its end on real parts.

Real Mosquitto, the cloud's registry, publisher and artifact service, and a simulated
fleet of real edge agents (``rpi4``, ``jetson-like`` and an ``mcu-gateway`` with no local
variant), driven through the CLI as a user would: a fleet-wide push, a group pinned to
another version, a signed rollback, an offline device, and a release whose artifact is
corrupt, which aborts the rollout and rolls the fleet back by itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit
sys.path.insert(0, str(Path(__file__).parent))  # for _cli_fleet

from _cli_fleet import MODEL, Cloud
from _release_kit import INPUT_SPECS, OUTPUT_SPECS, build_model

from fogline.cloud import Registry
from fogline.cloud.cli import app

runner = CliRunner()


def outcomes(summary: dict[str, Any]) -> dict[str, str]:
    return {d["device_id"]: d["outcome"] for d in summary["rollout"]["devices"]}


@pytest.fixture
def cloud(cli_fleet: Cloud) -> Cloud:
    return cli_fleet


@pytest.mark.slow
def test_publish_wait_follows_pushes_holds_and_rollbacks(cloud: Cloud) -> None:
    v1, v2, v3 = cloud.register(1), cloud.register(2), cloud.register(3)

    # A fleet-wide push: both devices with a variant update; the mcu has none.
    code, summary = cloud.publish(f"{MODEL}:{v1}", "--wait", "--timeout", "60")
    assert code == 0, summary
    rollout = summary["rollout"]
    assert rollout["result"] == "complete" and rollout["target"] == 2
    assert outcomes(summary) == {
        cloud.ids["rpi4"]: "updated",
        cloud.ids["jetson-like"]: "updated",
        cloud.ids["mcu-gateway"]: "no_variant",
    }
    assert cloud.running() == {"rpi4": v1, "jetson-like": v1, "mcu-gateway": None}

    # A group pinned to v2, then v3 fleet-wide: the group's devices are held on v2.
    code, summary = cloud.publish(f"{MODEL}:{v2}", "--to", "group:rpi4", "--wait")
    assert code == 0 and outcomes(summary) == {cloud.ids["rpi4"]: "updated"}
    # ... as a user sees it: the devices not updated, why, and one line at the end.
    args = ["model", "publish", f"{MODEL}:{v3}", "--wait", "--data-dir", str(cloud.data_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert f"rollout complete: 1/1 devices in fleet run {MODEL}:{v3}" in out
    assert "held" in out and "group:rpi4 wants v2" in out and "no variant for mcu" in out
    assert f"{MODEL}:{v3}" in result.stderr  # the progress bar
    assert cloud.running() == {"rpi4": v2, "jetson-like": v3, "mcu-gateway": None}

    # Going back needs --rollback; without it nothing is published.
    code, summary = cloud.publish(f"{MODEL}:{v1}", "--wait")
    assert code == 1 and summary["error"]["code"] == "registry_error"
    assert "--rollback" in summary["error"]["message"]
    code, summary = cloud.publish(f"{MODEL}:{v1}", "--rollback", "--wait", "--timeout", "60")
    assert code == 0 and summary["rollback"] is True, summary
    assert outcomes(summary)[cloud.ids["jetson-like"]] == "updated"
    assert cloud.running() == {"rpi4": v2, "jetson-like": v1, "mcu-gateway": None}


@pytest.mark.slow
def test_a_failing_rollout_aborts_and_rolls_back(cloud: Cloud) -> None:
    v1, v2 = cloud.register(1), cloud.register(2)
    assert cloud.publish(f"{MODEL}:{v1}", "--wait", "--timeout", "60")[0] == 0

    # An offline device is reported, not waited for.
    victim = cloud.ids["rpi4"]
    assert cloud.fleet.inject("kill", victim).ok
    # v2's artifact rots in the store: every install fails its hash check.
    sha = cloud.registry.get(MODEL, v2).variant("fp32").sha256
    path = cloud.registry.store.path(sha)
    path.chmod(0o644)
    path.write_bytes(b"\0" * path.stat().st_size)

    code, summary = cloud.publish(
        f"{MODEL}:{v2}", "--wait", "--timeout", "60", "--rollback-on-failure"
    )
    assert code == 1
    rollout = summary["rollout"]
    assert rollout["result"] == "aborted"
    assert outcomes(summary) == {
        victim: "offline",
        cloud.ids["jetson-like"]: "failed",
        cloud.ids["mcu-gateway"]: "no_variant",
    }
    assert summary["rolled_back_to"] == v1
    assert cloud.registry.desired("fleet").models == {MODEL: v1}  # type: ignore[union-attr]
    assert cloud.running()["jetson-like"] == v1  # it never left the last good model

    # The killed device comes back to the rolled-back desired state: v1, not v2.
    assert cloud.fleet.inject("restart", victim).ok
    assert cloud.fleet.wait_connected(30, [victim]) == []
    assert cloud.fleet.wait_for_version(MODEL, v1, 30, devices=[victim]) == []


def test_wait_options_are_checked_before_the_broker(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(build_model(seed=1))
    Registry(tmp_path).register(
        MODEL,
        artifacts={"fp32": path},
        assignments={"cpu-1t": "fp32"},
        inputs=INPUT_SPECS,
        outputs=OUTPUT_SPECS,
        source="imported",
        lineage={},
        card={},
    )
    for extra in (["--rollback-on-failure"], ["--max-failures", "2"]):
        result = runner.invoke(
            app, ["model", "publish", MODEL, *extra, "--data-dir", str(tmp_path), "--json"]
        )
        assert result.exit_code == 1
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "config_error" and "need --wait" in error["message"]
    bad = runner.invoke(app, ["model", "publish", MODEL, "--wait", "--timeout", "-1"])
    assert bad.exit_code == 2  # typer's own usage error
