"""Fixtures for the firmware simulator tests: a stand-in cloud publisher, a topic prefix
of each test's own, and a check that a test leaves no thread running."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for _sim_kit (tests have no packages)

from _sim_kit import SimCloud, build_model

from fogline.protocol import MqttSettings, Topics


@pytest.fixture
def sim_topics() -> Topics:
    return Topics(f"fogline-simtest/{uuid.uuid4().hex[:10]}")


@pytest.fixture
def sim_cloud(mqtt_settings: MqttSettings, sim_topics: Topics) -> Iterator[SimCloud]:
    cloud = SimCloud(mqtt_settings, sim_topics).start()
    try:
        yield cloud
    finally:
        cloud.close()


@pytest.fixture
def model_bytes() -> Callable[[int], bytes]:
    return lambda seed: build_model(seed=seed)


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """Fails the test if it leaves a thread running (checked after a short grace)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    left: list[threading.Thread] = []
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"threads left running: {sorted(t.name for t in left)}"
