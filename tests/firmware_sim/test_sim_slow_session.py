"""The simulator's slow device: a fixed multiple of the host's typical run, so host
delays pass through once instead of being multiplied by the speed factor."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fogline.firmware_sim import _device as sim_device


class _HostSession:
    """A host session whose runs take ``durations`` (seconds) in turn."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = durations
        self.runs = 0

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        time.sleep(self.durations[self.runs % len(self.durations)])
        self.runs += 1
        return ["out"]


def _timed_run(session: Any, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def test_slow_session_adds_the_typical_run_times_the_extra_factor() -> None:
    host = _HostSession([0.004] * 9 + [0.040])
    slow = sim_device._SlowSession(host, speed_factor=4.0)
    feed = {"x": np.zeros((1, 4), np.float32)}
    typical = [_timed_run(slow, feed) for _ in range(9)]
    # A steady host: about 4x the host's 4 ms.
    assert 0.014 < float(np.median(typical)) < 0.030
    # A host hiccup of 40 ms: the device is late by the hiccup, not by 4x the hiccup.
    hiccup = _timed_run(slow, feed)
    assert 0.050 < hiccup < 0.100
    assert host.runs == 10


def test_slow_session_keeps_a_typical_run_per_input_shape() -> None:
    host = _HostSession([0.002])
    slow = sim_device._SlowSession(host, speed_factor=3.0)
    slow.run(None, {"x": np.zeros((1, 4), np.float32)})
    slow.run(None, {"x": np.zeros((8, 4), np.float32)})
    assert len(slow._recent) == 2
    assert slow.run(None, {"x": np.zeros((1, 4), np.float32)}) == ["out"]
