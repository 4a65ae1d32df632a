"""Build and parse every Fogline MQTT topic.

All topics live under a configurable prefix (default ``fogline/v1``). Builders validate
every id they put into a topic; :meth:`Topics.parse` is their exact inverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ._errors import InvalidIdError, TopicError
from ._ids import validate_id

__all__ = ["DEFAULT_PREFIX", "ParsedTopic", "TopicKind", "Topics"]

DEFAULT_PREFIX = "fogline/v1"

TopicKind = Literal[
    "release",
    "artifact_get",
    "artifact_chunks",
    "fleet_desired",
    "fleet_keys",
    "group_desired",
    "device_desired",
    "device_state",
    "heartbeat",
    "events",
    "inbox",
    "infer_requests",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_INT64_MAX = (1 << 63) - 1
_VERSION = re.compile(r"[1-9][0-9]{0,18}")  # fits int64, like every other version field


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic names: its kind and the ids it carries."""

    kind: TopicKind
    model: str | None = None
    version: int | None = None
    sha256: str | None = None
    group: str | None = None
    device_id: str | None = None
    inbox_path: tuple[str, ...] = field(default=())


def _check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidIdError(f"sha256 {value!r} is not 64 lowercase hex digits")
    return value


def _check_version(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT64_MAX:
        raise InvalidIdError(f"version must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Topics:
    """The topic scheme under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not self.prefix or any(not lvl or set(lvl) & set("+#\x00") for lvl in levels):
            raise TopicError(
                f"topic prefix {self.prefix!r} must be non-empty levels without wildcards"
            )

    # -- builders ---------------------------------------------------------------------
    def release(self, model: str, version: int) -> str:
        m, v = validate_id(model, "model"), _check_version(version)
        return f"{self.prefix}/models/{m}/releases/{v}"

    def releases_of(self, model: str) -> str:
        """Filter matching every release of one model."""
        return f"{self.prefix}/models/{validate_id(model, 'model')}/releases/+"

    def all_releases(self) -> str:
        return f"{self.prefix}/models/+/releases/+"

    def artifact_get(self, sha256: str) -> str:
        return f"{self.prefix}/artifacts/{_check_sha256(sha256)}/get"

    def all_artifact_gets(self) -> str:
        return f"{self.prefix}/artifacts/+/get"

    def artifact_chunks(self, sha256: str) -> str:
        """Where the artifact service multicasts chunks that several devices asked for
        (requests with ``multicast``); a device subscribes only while it downloads."""
        return f"{self.prefix}/artifacts/{_check_sha256(sha256)}/chunks"

    def all_artifact_chunks(self) -> str:
        return f"{self.prefix}/artifacts/+/chunks"

    def fleet_desired(self) -> str:
        return f"{self.prefix}/fleet/desired"

    def fleet_keys(self) -> str:
        """The retained :class:`~fogline.protocol.TrustChain` of cloud signing keys."""
        return f"{self.prefix}/fleet/keys"

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{validate_id(group, 'group')}/desired"

    def device_desired(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/desired"

    def device_state(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/state"

    def heartbeat(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/heartbeat"

    def events(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/events"

    def inbox(self, device_id: str, *path: str) -> str:
        """A reply topic in one device's inbox, e.g. ``inbox(id, "artifacts")``."""
        parts = [validate_id(p, "inbox level") for p in path]
        base = f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/inbox"
        return "/".join([base, *parts])

    def inbox_filter(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id, 'device id')}/inbox/#"

    def infer_requests(self, model: str) -> str:
        return f"{self.prefix}/infer/{validate_id(model, 'model')}/requests"

    def all_infer_requests(self) -> str:
        return f"{self.prefix}/infer/+/requests"

    def all_device(self, leaf: Literal["state", "heartbeat", "events", "desired"]) -> str:
        """Filter over every device's ``state``, ``heartbeat``, ``events`` or ``desired``
        topic."""
        return f"{self.prefix}/devices/+/{leaf}"

    def all_group_desired(self) -> str:
        return f"{self.prefix}/groups/+/desired"

    # -- parser -----------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a concrete topic (no wildcards) back into what it names."""
        head = self.prefix + "/"
        if not isinstance(topic, str):
            raise TopicError(f"topic must be a string, got {type(topic).__name__}")
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        levels = topic[len(head) :].split("/")
        try:
            return self._parse_levels(levels, topic)
        except InvalidIdError as exc:
            raise TopicError(f"topic {topic!r}: {exc.message}") from None

    def _parse_levels(self, levels: list[str], topic: str) -> ParsedTopic:
        match levels:
            case ["models", model, "releases", version]:
                # ASCII digits only: str.isdigit() accepts superscripts and other scripts' digits,
                # which int() then rejects or silently reads.
                if not _VERSION.fullmatch(version):
                    raise TopicError(f"topic {topic!r}: version must be a positive integer")
                model_id = validate_id(model, "model")
                return ParsedTopic("release", model=model_id, version=int(version))
            case ["artifacts", sha, "get"]:
                return ParsedTopic("artifact_get", sha256=_check_sha256(sha))
            case ["artifacts", sha, "chunks"]:
                return ParsedTopic("artifact_chunks", sha256=_check_sha256(sha))
            case ["fleet", "desired"]:
                return ParsedTopic("fleet_desired")
            case ["fleet", "keys"]:
                return ParsedTopic("fleet_keys")
            case ["groups", group, "desired"]:
                return ParsedTopic("group_desired", group=validate_id(group, "group"))
            case ["devices", device_id, "desired"]:
                return ParsedTopic("device_desired", device_id=validate_id(device_id, "device id"))
            case ["devices", device_id, "state"]:
                return ParsedTopic("device_state", device_id=validate_id(device_id, "device id"))
            case ["devices", device_id, "heartbeat"]:
                return ParsedTopic("heartbeat", device_id=validate_id(device_id, "device id"))
            case ["devices", device_id, "events"]:
                return ParsedTopic("events", device_id=validate_id(device_id, "device id"))
            case ["devices", device_id, "inbox", *rest]:
                path = tuple(validate_id(p, "inbox level") for p in rest)
                return ParsedTopic(
                    "inbox", device_id=validate_id(device_id, "device id"), inbox_path=path
                )
            case ["infer", model, "requests"]:
                return ParsedTopic("infer_requests", model=validate_id(model, "model"))
        raise TopicError(f"topic {topic!r} is not a Fogline topic")
