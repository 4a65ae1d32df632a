"""Agent configuration: TOML plus FOGLINE_* overrides; every bad value is one
ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.edge import load_config
from fogline.protocol import ConfigError, SigningKey

KEY = SigningKey.generate().public_key.to_text()

GOOD = f"""
device_id = "cam-7"
device_class = "cpu-small"
groups = ["canary", "site-a"]
trusted_keys = ["{KEY}"]
data_dir = "/var/lib/fogline"
heartbeat_interval_s = 5.0

[mqtt]
url = "mqtt://broker:1883"
username = "cam-7"

[capacity]
intra_op_threads = 2
max_in_flight = 4

[http]
port = 0

[routing]
policy = "cascade"
default_budget_ms = 50.0
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_good_config_and_env_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    cfg = load_config(path, env={})
    assert cfg.device_id == "cam-7" and cfg.groups == ["canary", "site-a"]
    assert cfg.capacity.intra_op_threads == 2 and cfg.http.port == 0
    assert cfg.routing.policy == "cascade" and cfg.mqtt.username == "cam-7"
    env = {
        "FOGLINE_DEVICE_ID": "cam-8",
        "FOGLINE_BROKER_URL": "mqtt://other:1884",
        "FOGLINE_CAPACITY__MAX_IN_FLIGHT": "8",
        "FOGLINE_HTTP__ENABLED": "false",
        "FOGLINE_GROUPS": '["west"]',
        "FOGLINE_SOMETHING_ELSE": "ignored: not an agent field",
        "HOME": "/root",
    }
    cfg = load_config(path, env=env)
    assert cfg.device_id == "cam-8" and cfg.mqtt.port == 1884 and cfg.mqtt.username == "cam-7"
    assert cfg.capacity.max_in_flight == 8 and cfg.capacity.intra_op_threads == 2
    assert cfg.http.enabled is False and cfg.groups == ["west"]
    # Only the device id is required.
    assert load_config(env={"FOGLINE_DEVICE_ID": "x1"}).device_class == "generic"


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        ('device_id = "a"\nheartbeat_interval_s = "often"', "heartbeat_interval_s", "number"),
        ('device_id = "a"\nheartbeat_interval_s = 0', "heartbeat_interval_s", "greater than 0"),
        ('device_id = "a"\ncolour = "blue"', "colour", "Extra inputs"),
        ('device_id = "a"\n[capacity]\nmax_inflight = 3', "capacity.max_inflight", "Extra inputs"),
        (
            'device_id = "a"\n[capacity]\nintra_op_threads = 0',
            "capacity.intra_op_threads",
            "greater",
        ),
        ('device_id = "a/b"', "device_id", "may only contain"),
        ('device_id = "+"', "device_id", "may only contain"),
        ("groups = []", "device_id", "Field required"),
        ('device_id = "a"\ntrusted_keys = ["rsa:xyz"]', "trusted_keys", "ed25519"),
        ('device_id = "a"\ntrusted_keys = ["ed25519:!!!"]', "trusted_keys", "base64"),
        ('device_id = "a"\n[mqtt]\nurl = "http://x"', "mqtt.url", "mqtt://"),
        ('device_id = "a"\n[routing]\npolicy = "fastest"', "routing.policy", "local-first"),
        ('device_id = "a"\ntopic_prefix = "a/+/b"', "topic_prefix", "wildcards"),
        ('device_id = "a"\n[http]\nport = 70000', "http.port", "less than"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, field: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), env={})
    assert f"'{field}'" in info.value.message and detail in info.value.message
    assert str(tmp_path / "agent.toml") in info.value.message


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"FOGLINE_CAPACITY__MAX_IN_FLIGHT": "many"}, "capacity.max_in_flight"),
        ({"FOGLINE_HEARTBEAT_INTERVAL_S": "-1"}, "heartbeat_interval_s"),
        ({"FOGLINE_CAPACITY__BOGUS": "1"}, "capacity.bogus"),
        ({"FOGLINE_GROUPS": "[not json"}, "groups"),
        ({"FOGLINE_BROKER_URL": "ftp://x"}, "mqtt.url"),
    ],
)
def test_bad_env_override_names_the_field_and_variable(
    tmp_path: Path, env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD), env=env)
    assert f"'{field}'" in info.value.message
    assert "FOGLINE_" in info.value.message


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = "), env={})


def test_http_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    import socket

    from fogline.edge import Agent

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = load_config(
            env={},
            device_id="busy",
            data_dir=str(tmp_path / "d"),
            http={"port": port},
            mqtt={"url": "mqtt://127.0.0.1:1"},
        )
        agent = Agent(cfg)
        with pytest.raises(ConfigError, match=r"http\.port"):
            agent.start()
        agent.stop()
