"""Demo smoke test: a small, fast ``scripts/demo.py`` run (3 devices, 1 epoch, a short
traffic phase) completes, reports the expected fleet, and leaves no process behind.

The demo runs as a subprocess with its own broker and its own local Ray. While it runs,
a sampler records every process it starts (Mosquitto, Ray's GCS, raylet, workers, Serve
replicas...), so the check at the end is about exactly those processes, not about
whatever else runs on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
MODEL = "digits-cnn"


class DescendantSampler:
    """Records (pid, create_time, name) of every descendant of ``pid`` until stopped."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, name="demo-sampler", daemon=True)

    def start(self) -> DescendantSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                return  # the demo has exited
            for child in children:
                try:
                    self.seen[(child.pid, child.create_time())] = child.name()
                except psutil.Error:
                    continue
            self._stop.wait(self._period)

    def alive(self) -> list[str]:
        left = []
        for (pid, created), name in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{name} (pid {pid})")
            except psutil.Error:
                continue
        return left


@pytest.mark.slow
def test_small_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FOGLINE_BROKER_URL", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = [
        sys.executable, str(DEMO), "--devices", "3", "--epochs", "1", "--duration", "4",
        "--json", "--data-dir", str(tmp_path / "demo"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = DescendantSampler(proc.pid).start()
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # timed out: take the whole tree down before failing
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()
        sampler.stop()
    assert proc.returncode == 0, stderr[-4000:]

    report = json.loads(stdout)
    assert report["ok"], report["checks"]
    fleet = report["fleet"]
    assert fleet["devices"] == 3
    assert fleet["by_profile"] == {"jetson-like": 1, "mcu-gateway": 1, "rpi4": 1}
    assert (fleet["online"], fleet["offline"]) == (2, 1)  # one device was killed
    assert report["update"]["to_version"] == 2
    assert report["update"]["fleet_converged_s"] is not None
    for device in fleet["per_device"]:
        if device["profile"] == "mcu-gateway":
            assert device["reported"] == {}  # too weak for any local variant
            continue
        # Every device with a local model ran v2 (the killed one as last reported).
        assert device["reported"] == {MODEL: 2}, device
        if device["running"]:
            assert device["serving"] == {MODEL: 2}, device
    assert report["kill"]["monitor_offline_after_s"] is not None
    assert report["kill"]["reason"] == "last_will"
    assert all(check["ok"] for check in report["checks"])
    assert report["requests"]["answered"] > 0
    assert set(report["gate"]) == {"1", "2"}

    # Everything the demo started has stopped: broker, Ray (GCS, raylet, workers).
    names = set(sampler.seen.values())
    assert any("mosquitto" in n for n in names), names  # the sampler did see them
    assert any("raylet" in n or "gcs_server" in n for n in names), names
    assert sampler.alive() == []
