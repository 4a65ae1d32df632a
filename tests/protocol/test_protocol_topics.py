"""Topic builders and the parser: exact inverses, and no id that could turn a topic
into a wildcard, another level or another device's namespace gets through."""

from __future__ import annotations

from typing import Any

import msgpack
import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fogline.protocol import (
    DEFAULT_PREFIX,
    MAX_ID_LENGTH,
    DecodeError,
    DeviceState,
    Heartbeat,
    InvalidIdError,
    ParsedTopic,
    TopicError,
    Topics,
    decode,
    validate_id,
)

IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
SHA256 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
VERSIONS = st.integers(1, (1 << 63) - 1)
PREFIXES = st.one_of(
    st.just(DEFAULT_PREFIX),
    st.lists(st.from_regex(r"[a-z0-9_$-]{1,12}", fullmatch=True), min_size=1, max_size=4).map(
        "/".join
    ),
)

MALICIOUS_IDS = [
    "+",
    "#",
    "/",
    "a/b",
    "a+b",
    "dev#",
    "\x00",
    "a\x00b",
    "",
    "x" * (MAX_ID_LENGTH + 1),
    "-leading-dash",
    ".leading-dot",
    "..",
    "a b",
    " a",
    "a ",
    "a\tb",
    "a\nb",
    "a\r",
    "dév",
    "设备",
    "\uff41",  # fullwidth a
    "a\u200bb",  # zero-width space
    "$SYS",
    "$share",
    "a$b",
    "%c",
    "a*b",
]


def build_all(topics: Topics, ident: str, sha: str, version: int) -> list[tuple[str, ParsedTopic]]:
    """Every concrete topic builder with what it must parse back to."""
    return [
        (topics.release(ident, version), ParsedTopic("release", model=ident, version=version)),
        (topics.artifact_get(sha), ParsedTopic("artifact_get", sha256=sha)),
        (topics.artifact_chunks(sha), ParsedTopic("artifact_chunks", sha256=sha)),
        (topics.fleet_desired(), ParsedTopic("fleet_desired")),
        (topics.fleet_keys(), ParsedTopic("fleet_keys")),
        (topics.group_desired(ident), ParsedTopic("group_desired", group=ident)),
        (topics.device_desired(ident), ParsedTopic("device_desired", device_id=ident)),
        (topics.device_state(ident), ParsedTopic("device_state", device_id=ident)),
        (topics.heartbeat(ident), ParsedTopic("heartbeat", device_id=ident)),
        (topics.events(ident), ParsedTopic("events", device_id=ident)),
        (topics.inbox(ident), ParsedTopic("inbox", device_id=ident)),
        (
            topics.inbox(ident, "artifacts", ident),
            ParsedTopic("inbox", device_id=ident, inbox_path=("artifacts", ident)),
        ),
        (topics.infer_requests(ident), ParsedTopic("infer_requests", model=ident)),
    ]


@given(prefix=PREFIXES, ident=IDS, sha=SHA256, version=VERSIONS)
def test_every_builder_round_trips_through_parse(
    prefix: str, ident: str, sha: str, version: int
) -> None:
    topics = Topics(prefix)
    for topic, expected in build_all(topics, ident, sha, version):
        assert topic.startswith(prefix + "/")
        assert "+" not in topic and "#" not in topic
        assert topics.parse(topic) == expected


@given(prefix=PREFIXES, ident=IDS, sha=SHA256, version=VERSIONS)
def test_filters_match_what_the_builders_build(
    prefix: str, ident: str, sha: str, version: int
) -> None:
    t = Topics(prefix)
    pairs = [
        (t.releases_of(ident), t.release(ident, version)),
        (t.all_releases(), t.release(ident, version)),
        (t.all_artifact_gets(), t.artifact_get(sha)),
        (t.all_artifact_chunks(), t.artifact_chunks(sha)),
        (t.inbox_filter(ident), t.inbox(ident, "artifacts")),
        (t.inbox_filter(ident), t.inbox(ident)),
        (t.all_infer_requests(), t.infer_requests(ident)),
        (t.all_device("state"), t.device_state(ident)),
        (t.all_device("heartbeat"), t.heartbeat(ident)),
        (t.all_device("events"), t.events(ident)),
        (t.all_device("desired"), t.device_desired(ident)),
        (t.all_group_desired(), t.group_desired(ident)),
    ]
    for topic_filter, topic in pairs:
        assert paho.topic_matches_sub(topic_filter, topic), (topic_filter, topic)
    # ... and nothing else: one device's inbox filter never matches another's.
    assert not paho.topic_matches_sub(t.inbox_filter(ident), t.inbox(ident + "x"))


def test_filters_do_not_parse() -> None:
    t = Topics()
    for topic_filter in [
        t.all_releases(),
        t.releases_of("m"),
        t.all_artifact_gets(),
        t.all_artifact_chunks(),
        t.inbox_filter("d"),
        t.all_infer_requests(),
        t.all_device("state"),
    ]:
        with pytest.raises(TopicError):
            t.parse(topic_filter)


def test_the_default_layout() -> None:
    t = Topics()
    assert t.release("digits", 3) == "fogline/v1/models/digits/releases/3"
    assert t.artifact_get("a" * 64) == f"fogline/v1/artifacts/{'a' * 64}/get"
    assert t.artifact_chunks("a" * 64) == f"fogline/v1/artifacts/{'a' * 64}/chunks"
    assert t.fleet_desired() == "fogline/v1/fleet/desired"
    assert t.fleet_keys() == "fogline/v1/fleet/keys"
    assert t.group_desired("canary") == "fogline/v1/groups/canary/desired"
    assert t.device_desired("d1") == "fogline/v1/devices/d1/desired"
    assert t.device_state("d1") == "fogline/v1/devices/d1/state"
    assert t.heartbeat("d1") == "fogline/v1/devices/d1/heartbeat"
    assert t.events("d1") == "fogline/v1/devices/d1/events"
    assert t.inbox("d1", "artifacts") == "fogline/v1/devices/d1/inbox/artifacts"
    assert t.infer_requests("digits") == "fogline/v1/infer/digits/requests"


@pytest.mark.parametrize("ok", ["a", "0", "A-b.c_d", "x" * MAX_ID_LENGTH, "dev-001.eu_west"])
def test_valid_ids(ok: str) -> None:
    assert validate_id(ok) == ok


@pytest.mark.parametrize("bad", MALICIOUS_IDS)
def test_builders_reject_malicious_ids(bad: str) -> None:
    t = Topics()
    builders = [
        lambda: t.release(bad, 1),
        lambda: t.releases_of(bad),
        lambda: t.group_desired(bad),
        lambda: t.device_desired(bad),
        lambda: t.device_state(bad),
        lambda: t.heartbeat(bad),
        lambda: t.events(bad),
        lambda: t.inbox(bad),
        lambda: t.inbox("ok", bad),
        lambda: t.inbox_filter(bad),
        lambda: t.infer_requests(bad),
    ]
    for build in builders:
        with pytest.raises(InvalidIdError):
            build()
    with pytest.raises(InvalidIdError):
        validate_id(bad, "device id")


@pytest.mark.parametrize("bad", MALICIOUS_IDS)
def test_parse_rejects_malicious_ids(bad: str) -> None:
    t = Topics()
    for template in [
        "fogline/v1/models/{}/releases/1",
        "fogline/v1/groups/{}/desired",
        "fogline/v1/devices/{}/desired",
        "fogline/v1/devices/{}/state",
        "fogline/v1/devices/{}/heartbeat",
        "fogline/v1/devices/{}/events",
        "fogline/v1/devices/{}/inbox",
        "fogline/v1/devices/ok/inbox/{}",
        "fogline/v1/infer/{}/requests",
    ]:
        if bad == "a/b" and "inbox/{}" in template:
            continue  # two valid inbox levels, a legitimate reply topic
        with pytest.raises(TopicError):
            t.parse(template.format(bad))


@pytest.mark.parametrize("bad", MALICIOUS_IDS)
def test_ids_inside_messages_are_validated(bad: str) -> None:
    with pytest.raises(ValidationError):
        DeviceState(device_id=bad, status="online", at=1.0)
    body = {"device_id": bad, "status": "online", "at": 1.0}
    raw = {"type": "device_state", "v": 1, "id": "m", "ts": 1.0, "body": body}
    with pytest.raises(DecodeError, match="device_id"):
        decode(msgpack.packb(raw))
    with pytest.raises(ValidationError):
        Heartbeat(
            device_id="ok",
            device_class="c",
            groups=[bad],
            seq=0,
            at=1.0,
            uptime_s=0.0,
            interval_s=1.0,
        )


@pytest.mark.parametrize("value", [None, 7, b"dev", ["dev"]])
def test_non_string_ids(value: Any) -> None:
    with pytest.raises(InvalidIdError):
        validate_id(value)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1", None, 1 << 63])
def test_release_builder_rejects_bad_versions(version: Any) -> None:
    with pytest.raises(InvalidIdError):
        Topics().release("m", version)


@pytest.mark.parametrize(
    "version", ["0", "01", "-1", "+1", "1.0", "1e3", "", " 1", "\u00b2", "\u0661", "9" * 20]
)
def test_parse_rejects_bad_versions(version: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(f"fogline/v1/models/m/releases/{version}")


@pytest.mark.parametrize("sha", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "+", "#"])
def test_bad_sha256(sha: str) -> None:
    with pytest.raises(InvalidIdError):
        Topics().artifact_get(sha)
    with pytest.raises(TopicError):
        Topics().parse(f"fogline/v1/artifacts/{sha}/get")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fogline",
        "fogline/v1",
        "fogline/v1/",
        "fogline/v2/fleet/desired",
        "other/v1/fleet/desired",
        "$SYS/broker/uptime",
        "fogline/v1/fleet/desired/",
        "fogline/v1/fleet/desired/extra",
        "fogline/v1/fleet",
        "fogline/v1/devices/d1",
        "fogline/v1/devices/d1/unknown",
        "fogline/v1/devices//state",
        "fogline/v1/devices/d1/inbox/",
        "fogline/v1/devices/d1/inbox//x",
        "fogline/v1/models/m/releases",
        "fogline/v1/artifacts/get",
        "fogline/v1/infer/m/responses",
        "/fogline/v1/fleet/desired",
        "fogline//v1/fleet/desired",
    ],
)
def test_parse_rejects_other_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("topic", [None, 1, b"fogline/v1/fleet/desired"])
def test_parse_rejects_non_strings(topic: Any) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("prefix", ["", "/", "a/", "/a", "a//b", "a/+", "#", "a/#/b", "a\x00"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix)


def test_custom_prefix_does_not_parse_the_default() -> None:
    with pytest.raises(TopicError):
        Topics("acme/fog").parse("fogline/v1/fleet/desired")
    assert Topics("acme/fog").parse("acme/fog/fleet/desired") == ParsedTopic("fleet_desired")
