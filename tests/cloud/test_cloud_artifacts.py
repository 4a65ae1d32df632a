"""The artifact service on a real Mosquitto: chunks, resume, unknown hashes, garbage."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from fogline.cloud import ArtifactService, ArtifactStore
from fogline.protocol import (
    ArtifactChunk,
    ChunkRequest,
    ErrorReply,
    Message,
    MqttSettings,
    MqttTransport,
    Topics,
    decode,
    encode,
)

TOPICS = Topics()
CHUNK = 64 * 1024


@pytest.fixture
def service(tmp_path: Path, mqtt_settings: MqttSettings) -> Iterator[ArtifactService]:
    transport = MqttTransport(mqtt_settings)
    transport.connect()
    svc = ArtifactService(transport, ArtifactStore(tmp_path / "store"), max_reply_bytes=CHUNK)
    svc.start()
    try:
        yield svc
    finally:
        svc.close()
        transport.close()


class Requester:
    def __init__(self, make_inbox: Callable[[], object]) -> None:
        self.inbox = make_inbox()
        self.reply_to = TOPICS.inbox("dev-" + uuid.uuid4().hex[:8], "artifacts")
        self.inbox.listen(self.reply_to)  # type: ignore[attr-defined]

    def send(self, sha: str, payload: bytes) -> None:
        self.inbox.transport.publish(TOPICS.artifact_get(sha), payload, qos=1)  # type: ignore[attr-defined]

    def request(self, sha: str, offset: int, length: int) -> str:
        cid = uuid.uuid4().hex
        req = ChunkRequest(
            correlation_id=cid,
            reply_to=self.reply_to,
            sha256=sha,
            offset=offset,
            length=length,
            device_id="dev-1",
        )
        self.send(sha, encode(req))
        return cid

    def reply(self, timeout: float = 10.0) -> Message:
        return decode(self.inbox.get(timeout).payload)  # type: ignore[attr-defined]


def fetch(req: Requester, sha: str, start: int, size: int) -> bytes:
    """Download [start, size) one request at a time, verifying every chunk."""
    out = bytearray()
    offset = start
    while offset < size:
        cid = req.request(sha, offset, CHUNK)
        chunk = req.reply()
        assert isinstance(chunk, ArtifactChunk) and chunk.correlation_id == cid
        assert chunk.offset == offset and chunk.total_size == size
        assert hashlib.sha256(chunk.data).hexdigest() == chunk.chunk_sha256
        out += chunk.data
        offset += len(chunk.data)
    return bytes(out)


def test_serves_whole_artifact_in_chunks_and_resumes(
    service: ArtifactService, cloud_inbox: Callable[[], object]
) -> None:
    data = os.urandom(5 * CHUNK + 123)
    sha = service.store.put_bytes(data)
    req = Requester(cloud_inbox)
    assert fetch(req, sha, 0, len(data)) == data
    # Resume from arbitrary offsets, including mid-chunk and the last byte.
    for start in (CHUNK * 3, 12345, len(data) - 1):
        assert fetch(req, sha, start, len(data)) == data[start:]
    # One request larger than the reply size is answered with several chunks.
    cid = req.request(sha, 0, 3 * CHUNK)
    parts = [req.reply() for _ in range(3)]
    assert all(isinstance(p, ArtifactChunk) and p.correlation_id == cid for p in parts)
    assert b"".join(p.data for p in parts) == data[: 3 * CHUNK]  # type: ignore[union-attr]
    assert service.stats()["chunks_served"] >= 9


def test_unknown_hash_and_bad_offset_get_error_replies(
    service: ArtifactService, cloud_inbox: Callable[[], object]
) -> None:
    req = Requester(cloud_inbox)
    cid = req.request("ab" * 32, 0, 100)
    reply = req.reply()
    assert (
        isinstance(reply, ErrorReply)
        and reply.code == "unknown_artifact"
        and reply.correlation_id == cid
    )
    sha = service.store.put_bytes(b"small artifact")
    req.request(sha, 10_000, 100)
    reply = req.reply()
    assert isinstance(reply, ErrorReply) and reply.code == "artifact_error"
    # A request whose body names another hash than its topic.
    other = ChunkRequest(
        correlation_id="c1", reply_to=req.reply_to, sha256="cd" * 32, offset=0, length=10
    )
    req.send(sha, encode(other))
    reply = req.reply()
    assert isinstance(reply, ErrorReply) and reply.code == "protocol_error"


def test_malformed_requests_are_answered_or_dropped_and_service_keeps_serving(
    service: ArtifactService, cloud_inbox: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> None:
    sha = service.store.put_bytes(b"still here " * 100)
    req = Requester(cloud_inbox)
    body = {
        "correlation_id": "bad-1",
        "reply_to": req.reply_to,
        "sha256": sha,
        "offset": -5,
        "length": 10,
    }
    envelope = {"type": "chunk_request", "v": 1, "id": "x", "ts": 1.0, "body": body}
    answerable = [
        msgpack.packb(envelope),  # negative offset
        msgpack.packb({**envelope, "body": {**body, "length": 0}}),
        msgpack.packb({**envelope, "body": {**body, "extra": 1, "offset": 0}}),
    ]
    droppable = [
        b"",
        b"\xff\xfe garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({**envelope, "body": {**body, "reply_to": "a/+/b"}}),
        msgpack.packb({**envelope, "body": {"correlation_id": "x"}}),
        os.urandom(2000),
    ]
    with caplog.at_level(logging.WARNING, logger="fogline.cloud.artifacts"):
        for payload in answerable:
            req.send(sha, payload)
            reply = req.reply()
            assert isinstance(reply, ErrorReply) and reply.code == "decode_error"
            assert reply.correlation_id == "bad-1"
        for payload in droppable:
            req.send(sha, payload)
        # Liveness: a good request after the garbage is still served.
        assert fetch(req, sha, 0, 1100) == b"still here " * 100
    with pytest.raises(queue.Empty):
        req.inbox.get(timeout=0.3)  # type: ignore[attr-defined]
    assert service.stats()["dropped"] == len(droppable)
    assert service.stats()["errors_replied"] == len(answerable)
    assert "dropped malformed chunk request" in caplog.text


def test_shared_subscription_replicas_answer_once_each(
    tmp_path: Path, mqtt_settings: MqttSettings, cloud_inbox: Callable[[], object]
) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = os.urandom(4 * CHUNK)
    sha = store.put_bytes(data)
    transports = [MqttTransport(mqtt_settings) for _ in range(2)]
    services = [
        ArtifactService(t, store, share_group="artifacts", max_reply_bytes=CHUNK)
        for t in transports
    ]
    try:
        for t, s in zip(transports, services, strict=True):
            t.connect()
            s.start()
        req = Requester(cloud_inbox)
        assert fetch(req, sha, 0, len(data)) == data
        with pytest.raises(queue.Empty):
            req.inbox.get(timeout=0.3)  # type: ignore[attr-defined]  # no duplicate replies
        assert sum(s.stats()["chunks_served"] for s in services) == 4
    finally:
        for t, s in zip(transports, services, strict=True):
            s.close()
            t.close()
