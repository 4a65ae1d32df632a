"""Fixtures shared by the integration tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for _cli_fleet

from _cli_fleet import Cloud, cli_fleet

from fogline.protocol import MqttSettings


@pytest.fixture(name="cli_fleet")
def cli_fleet_fixture(
    mqtt_settings: MqttSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cloud]:
    with cli_fleet(mqtt_settings, tmp_path, monkeypatch) as cloud:
        yield cloud
