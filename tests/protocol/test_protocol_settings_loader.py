"""The one settings loader: file, then environment, then overrides; every problem is one
ConfigError naming the field path and where the bad value came from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogline.protocol import (
    ConfigError,
    MqttSettings,
    TopicPrefix,
    config_error,
    load_settings,
    read_toml,
    validate_settings,
)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threads: int = Field(default=1, ge=1)
    queue: int = 8


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    port: int = Field(default=80, ge=0, le=65535)
    enabled: bool = True
    groups: list[str] = []
    limits: Limits = Limits()
    mqtt: MqttSettings = MqttSettings()
    extra: dict[str, int] = {}
    topic_prefix: TopicPrefix = "fogline/v1"


def _toml(tmp_path: Path, text: str, name: str = "tool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'name = "file"\nport = 1\n[limits]\nthreads = 2\nqueue = 3\n')
    env = {"FOGLINE_PORT": "2", "FOGLINE_LIMITS__QUEUE": "4", "FOGLINE_NAME": "env"}
    tool = load_settings(Tool, path, env=env, overrides={"name": "flag"})
    assert (tool.name, tool.port) == ("flag", 2)
    # Nested values merge field by field across all three layers.
    assert (tool.limits.threads, tool.limits.queue) == (2, 4)
    assert load_settings(Tool, path, env={}).port == 1
    assert load_settings(Tool, env={}, overrides={"name": "only"}).port == 80


def test_env_conventions(tmp_path: Path) -> None:
    env = {
        "FOGLINE_NAME": "cam",
        "FOGLINE_ENABLED": "false",
        "FOGLINE_GROUPS": '["a", "b"]',
        "FOGLINE_EXTRA": ' {"x": 1}',
        "FOGLINE_LIMITS__THREADS": "3",
        "FOGLINE_PORT": "",  # empty counts as unset
        "FOGLINE_NOT_A_FIELD": "ignored: another tool's variable",
        "FOGLINE_": "ignored",
        "OTHER_PORT": "1",
    }
    tool = load_settings(Tool, env=env)
    assert tool.name == "cam" and tool.enabled is False and tool.groups == ["a", "b"]
    assert tool.extra == {"x": 1} and tool.limits.threads == 3 and tool.port == 80


def test_a_json_table_then_fields_inside_it() -> None:
    env = {
        "FOGLINE_NAME": "n",
        "FOGLINE_LIMITS": '{"threads": 5, "queue": 6}',
        "FOGLINE_LIMITS__QUEUE": "7",
    }
    tool = load_settings(Tool, env=env)
    assert (tool.limits.threads, tool.limits.queue) == (5, 7)


def test_aliases_and_their_canonical_names(tmp_path: Path) -> None:
    aliases = {"FOGLINE_BROKER_URL": ("mqtt", "url")}
    path = _toml(tmp_path, 'name = "n"\n[mqtt]\nurl = "mqtt://file:1"\nusername = "u"\n')
    tool = load_settings(Tool, path, env={"FOGLINE_BROKER_URL": "mqtt://alias:2"}, aliases=aliases)
    assert tool.mqtt.url == "mqtt://alias:2" and tool.mqtt.username == "u"
    both = {"FOGLINE_BROKER_URL": "mqtt://alias:2", "FOGLINE_MQTT__URL": "mqtt://canon:3"}
    assert load_settings(Tool, path, env=both, aliases=aliases).mqtt.url == "mqtt://canon:3"


def test_a_prefix_of_its_own(tmp_path: Path) -> None:
    env = {"FOGLINE_PORT": "1", "FOGLINE_TOOL__PORT": "2", "FOGLINE_TOOL__NAME": "t"}
    tool = load_settings(Tool, env=env, env_prefix="FOGLINE_TOOL__", strict_env=True)
    assert tool.port == 2
    # With a prefix it owns, a typo is an error rather than silently ignored.
    with pytest.raises(ConfigError) as info:
        load_settings(
            Tool,
            env={**env, "FOGLINE_TOOL__PORTT": "3"},
            env_prefix="FOGLINE_TOOL__",
            strict_env=True,
        )
    assert info.value.message.startswith("$FOGLINE_TOOL__PORTT: field 'portt': Extra inputs")


def test_section(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[tool]\nname = "t"\n[other]\nanything = 1\n')
    assert load_settings(Tool, path, section="tool", env={}).name == "t"
    # A file without the table is the table itself.
    flat = _toml(tmp_path, 'name = "flat"\n', "flat.toml")
    assert load_settings(Tool, flat, section="tool", env={}).name == "flat"
    with pytest.raises(ConfigError) as info:
        load_settings(
            Tool, _toml(tmp_path, '[tool]\nname = "t"\nport = -1\n'), section="tool", env={}
        )
    assert f"{tmp_path / 'tool.toml'} [tool]: field 'port'" in info.value.message


def test_none_overrides_are_not_given() -> None:
    tool = load_settings(Tool, env={"FOGLINE_PORT": "5"}, overrides={"name": "n", "port": None})
    assert tool.port == 5
    tool = load_settings(Tool, env={}, overrides={"name": "n", "limits": {"queue": None}})
    assert tool.limits.queue == 8


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGLINE_NAME", "from-os")
    assert load_settings(Tool).name == "from-os"
    assert os.environ["FOGLINE_NAME"] == "from-os"


@pytest.mark.parametrize(
    ("text", "env", "overrides", "source", "field", "detail"),
    [
        ('name = "n"\nport = "eighty"', {}, {}, "FILE", "port", "valid integer"),
        ('name = "n"\ncolour = "blue"', {}, {}, "FILE", "colour", "Extra inputs"),
        ('name = "n"\n[limits]\nthread = 1', {}, {}, "FILE", "limits.thread", "Extra inputs"),
        ('name = "n"\n[limits]\nthreads = 0', {}, {}, "FILE", "limits.threads", "greater"),
        ("port = 1", {}, {}, "FILE", "name", "Field required"),
        ('name = "n"', {"FOGLINE_PORT": "99999"}, {}, "$FOGLINE_PORT", "port", "less than"),
        (
            'name = "n"',
            {"FOGLINE_LIMITS__THREADS": "many"},
            {},
            "$FOGLINE_LIMITS__THREADS",
            "limits.threads",
            "valid integer",
        ),
        (
            'name = "n"',
            {"FOGLINE_LIMITS__BOGUS": "1"},
            {},
            "$FOGLINE_LIMITS__BOGUS",
            "limits.bogus",
            "Extra inputs",
        ),
        ('name = "n"', {"FOGLINE_GROUPS": "[1]"}, {}, "$FOGLINE_GROUPS", "groups.0", "string"),
        (
            'name = "n"',
            {"FOGLINE_LIMITS": '{"queue": "x"}'},
            {},
            "$FOGLINE_LIMITS",
            "limits.queue",
            "valid integer",
        ),
        ('name = "n"', {}, {"port": -1}, "overrides", "port", "greater"),
        ('name = "n"', {}, {"nope": 1}, "overrides", "nope", "Extra inputs"),
        ('name = "n"', {}, {"limits": {"queue": "q"}}, "overrides", "limits.queue", "integer"),
        ('name = "n"\n[mqtt]\nurl = "http://x"', {}, {}, "FILE", "mqtt.url", "mqtt://"),
    ],
)
def test_every_error_names_the_field_and_its_source(
    tmp_path: Path,
    text: str,
    env: dict[str, str],
    overrides: dict[str, object],
    source: str,
    field: str,
    detail: str,
) -> None:
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(Tool, path, env=env, overrides=overrides)
    expected = str(path) if source == "FILE" else source
    assert info.value.message.startswith(f"{expected}: field '{field}': ")
    assert detail in info.value.message
    assert info.value.code == "config_error"


def test_a_missing_required_field_without_a_file_blames_the_defaults() -> None:
    with pytest.raises(ConfigError, match=r"^defaults: field 'name': Field required"):
        load_settings(Tool, env={})


def test_a_table_wide_error_names_every_source_inside_it(tmp_path: Path) -> None:
    # MqttSettings checks reconnect_min_s <= reconnect_max_s on the whole table.
    path = _toml(tmp_path, 'name = "n"\n[mqtt]\nreconnect_max_s = 1.0\n')
    with pytest.raises(ConfigError) as info:
        load_settings(Tool, path, env={"FOGLINE_MQTT__RECONNECT_MIN_S": "5"})
    assert info.value.message.startswith(f"$FOGLINE_MQTT__RECONNECT_MIN_S, {path}: field 'mqtt'")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FOGLINE_GROUPS": "[not json"}, "$FOGLINE_GROUPS: field 'groups': not valid JSON"),
        ({"FOGLINE_LIMITS": "{oops}"}, "$FOGLINE_LIMITS: field 'limits': not valid JSON"),
        (
            {"FOGLINE_NAME": "n", "FOGLINE_PORT__INNER": "1"},
            "$FOGLINE_PORT__INNER: field 'port' is not a table",
        ),
    ],
)
def test_env_values_that_cannot_be_placed(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    path = _toml(tmp_path, 'name = "n"\nport = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(Tool, path, env=env)
    assert info.value.message.startswith(message)


def test_several_problems_are_counted(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'port = -1\nenabled = "perhaps"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(Tool, path, env={})
    assert info.value.message.endswith("(and 2 more problems)")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config file .*: no such file"),
        ("DIR", "cannot read config file .*: Is a directory"),
        (b"name = ", "is not valid TOML"),
        (b"this is = = not toml", "is not valid TOML"),
        (b"\xff\xfe\x00garbage", "is not valid TOML"),
        (b'name = "n"\nname = "twice"', "is not valid TOML"),
    ],
)
def test_unreadable_or_garbage_files(
    tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / "tool.toml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(Tool, path, env={})
    with pytest.raises(ConfigError, match=message):
        read_toml(path)


def test_config_error_and_validate_settings() -> None:
    with pytest.raises(ValidationError) as caught:
        Tool.model_validate({"port": "x"})
    error = config_error(caught.value, "somewhere")
    assert isinstance(error, ConfigError)
    assert error.message.startswith("somewhere: field ")
    assert error.message.endswith("(and 1 more problem)")
    assert validate_settings(Tool, {"name": "v"}, "here").name == "v"
    with pytest.raises(ConfigError, match=r"^fleet device d1: field 'limits.queue': "):
        validate_settings(Tool, {"name": "v", "limits": {"queue": []}}, "fleet device d1")
    with pytest.raises(ConfigError, match=r"^here: field '<root>': "):
        validate_settings(Tool, 5, "here")


@pytest.mark.parametrize("prefix", ["a/+/b", "#", "a//b", "/a", '["not a string"]'])
def test_a_bad_topic_prefix_is_a_config_error_naming_it(prefix: str) -> None:
    env = {"FOGLINE_NAME": "n", "FOGLINE_TOPIC_PREFIX": prefix}
    with pytest.raises(ConfigError, match=r"^\$FOGLINE_TOPIC_PREFIX: field 'topic_prefix': "):
        load_settings(Tool, env=env)


def test_a_good_topic_prefix() -> None:
    env = {"FOGLINE_NAME": "n", "FOGLINE_TOPIC_PREFIX": "site/a"}
    assert load_settings(Tool, env=env).topic_prefix == "site/a"
