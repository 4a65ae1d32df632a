"""Request coalescing: the artifact service multicasts a piece that several devices ask
for at about the same time ONCE on ``artifacts/{sha}/chunks``; real fetchers, real
service, real Mosquitto."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fogline.cloud import ArtifactService, ArtifactStore
from fogline.cloud._artifacts import _Batcher
from fogline.edge import DeliveryConfig, ModelStore
from fogline.edge._download import ArtifactFetcher
from fogline.protocol import (
    ArtifactChunk,
    ChunkRequest,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    Topics,
    decode,
    encode,
)

CHUNK = 64 * 1024


@pytest.fixture
def topics() -> Topics:
    return Topics(f"fogline-test/{uuid.uuid4().hex[:10]}")


@pytest.fixture
def service_factory(
    tmp_path: Path, topics: Topics, transports: Callable[[], MqttTransport]
) -> Iterator[Callable[..., ArtifactService]]:
    made: list[ArtifactService] = []

    def make(**kwargs: Any) -> ArtifactService:
        store = ArtifactStore(tmp_path / "store")
        svc = ArtifactService(transports(), store, topics=topics, **kwargs)
        made.append(svc)
        svc.start()
        return svc

    try:
        yield make
    finally:
        for svc in made:
            svc.close()


class Device:
    """One downloading device: its own connection, fetcher and store."""

    def __init__(
        self,
        transport: MqttTransport,
        topics: Topics,
        root: Path,
        *,
        multicast: bool = True,
        window: int = 4,
    ) -> None:
        self.id = "dev-" + uuid.uuid4().hex[:8]
        self.transport = transport
        settings = DeliveryConfig(chunk_timeout_s=2.0, chunk_retries=3, window=window)
        self.fetcher = ArtifactFetcher(transport, topics, self.id, settings, multicast=multicast)
        self.fetcher.subscribe()
        self.store = ModelStore(root / self.id)

    def download(self, sha: str, size: int) -> bytes:
        part = self.store.partial(sha, size, CHUNK)
        try:
            self.fetcher.fetch(part, threading.Event())
        finally:
            part.close()
        return part.path.read_bytes()


def _together(devices: list[Device], sha: str, size: int) -> list[bytes]:
    results: list[bytes | BaseException] = [b""] * len(devices)

    def run(i: int) -> None:
        try:
            results[i] = devices[i].download(sha, size)
        except BaseException as exc:  # reported below, on the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, bytes)]


def test_concurrent_downloads_share_one_publish_per_chunk(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    # A long quiet window so that every device's requests join the first batch.
    svc = service_factory(coalesce_s=1.0, coalesce_max_s=5.0)
    data = os.urandom(3 * CHUNK + 99)
    sha = svc.store.put_bytes(data)
    devices = [Device(transports(), topics, tmp_path) for _ in range(3)]
    assert _together(devices, sha, len(data)) == [data] * 3
    stats = svc.stats()
    assert stats["chunks_multicast"] == 4  # one publish per chunk, for three devices
    assert stats["chunks_served"] == 0
    assert stats["requests_coalesced"] == 8
    assert all(d.fetcher.multicast_chunks == 4 for d in devices)
    for d in devices:  # done: no longer subscribed to the chunks topic
        assert d.fetcher._fetching is None
        assert topics.artifact_chunks(sha) not in d.transport._subscriptions


def test_a_chunk_another_device_asked_for_is_taken_and_not_requested(
    transports: Callable[[], MqttTransport], topics: Topics, tmp_path: Path
) -> None:
    # A stand-in service answers the device's first request with the OTHER chunk
    # first (as another device's batch would arrive), then the one it asked for.
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    server = transports()
    asked: list[ChunkRequest] = []

    def chunk(offset: int) -> bytes:
        piece = data[offset : offset + CHUNK]
        return encode(
            ArtifactChunk(
                correlation_id="multicast",
                sha256=sha,
                offset=offset,
                total_size=len(data),
                chunk_sha256=hashlib.sha256(piece).hexdigest(),
                data=piece,
            )
        )

    def serve(msg: MqttMessage) -> None:
        request = decode(msg.payload, ChunkRequest)
        asked.append(request)
        if len(asked) == 1:  # one topic, one publisher: the broker keeps this order
            server.publish(topics.artifact_chunks(sha), chunk(CHUNK), qos=1)
            server.publish(topics.artifact_chunks(sha), chunk(request.offset), qos=1)

    server.subscribe(topics.all_artifact_gets(), serve, qos=1, wait=True)
    device = Device(transports(), topics, tmp_path, window=1)  # asks for one chunk at a time
    assert device.download(sha, len(data)) == data
    assert [(r.offset, r.multicast) for r in asked] == [(0, True)]
    assert device.fetcher.requests_sent == 1
    assert device.fetcher.multicast_chunks == 2


def test_a_late_device_still_completes(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    svc = service_factory(coalesce_s=0.05)
    data = os.urandom(2 * CHUNK + 1)
    sha = svc.store.put_bytes(data)
    first, late = (Device(transports(), topics, tmp_path) for _ in range(2))
    assert first.download(sha, len(data)) == data
    # Its batches are long gone: the late device's requests open new ones.
    assert late.download(sha, len(data)) == data
    assert svc.stats()["chunks_multicast"] == 6


def test_a_partial_download_resumes_over_multicast(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    svc = service_factory(coalesce_s=0.05)
    data = os.urandom(4 * CHUNK)
    sha = svc.store.put_bytes(data)
    device = Device(transports(), topics, tmp_path)
    part = device.store.partial(sha, len(data), CHUNK)
    part.write(0, data[:CHUNK])
    part.write(2, data[2 * CHUNK : 3 * CHUNK])
    part.close()
    assert device.download(sha, len(data)) == data
    assert svc.stats()["chunks_multicast"] == 2  # only the missing chunks


def test_tampered_multicast_chunk_is_rejected_and_fetched_again(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    # The real batch waits a second; a forger answers every multicast request at once.
    svc = service_factory(coalesce_s=1.0, coalesce_max_s=5.0)
    data = os.urandom(2 * CHUNK)
    sha = svc.store.put_bytes(data)
    forger = transports()
    forged = 0

    def forge(msg: MqttMessage) -> None:
        nonlocal forged
        request = decode(msg.payload, ChunkRequest)
        if not request.multicast:
            return
        good = data[request.offset : request.offset + request.length]
        chunk = ArtifactChunk(
            correlation_id="forged",
            sha256=sha,
            offset=request.offset,
            total_size=len(data),
            chunk_sha256=hashlib.sha256(good).hexdigest(),  # claims the real hash
            data=bytes(b ^ 0xFF for b in good),
        )
        forger.publish(topics.artifact_chunks(sha), encode(chunk), qos=1)
        forged += 1

    forger.subscribe(topics.all_artifact_gets(), forge, qos=1, wait=True)
    device = Device(transports(), topics, tmp_path)
    assert device.download(sha, len(data)) == data
    assert forged == 2
    assert device.fetcher.bad_chunks == 2
    # The retries asked for unicast replies on the device's inbox.
    assert svc.stats()["chunks_served"] == 2


def test_without_multicast_the_old_unicast_path_serves(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    svc = service_factory()
    data = os.urandom(CHUNK + 5)
    sha = svc.store.put_bytes(data)
    device = Device(transports(), topics, tmp_path, multicast=False)
    assert device.download(sha, len(data)) == data
    stats = svc.stats()
    assert stats["chunks_served"] == 2 and stats["chunks_multicast"] == 0


def test_coalescing_windows_are_validated(tmp_path: Path, mqtt_settings: MqttSettings) -> None:
    transport = MqttTransport(mqtt_settings)
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ValueError, match="coalesce"):
        ArtifactService(transport, store, coalesce_s=2.0, coalesce_max_s=1.0)
    with pytest.raises(ValueError, match="coalesce"):
        ArtifactService(transport, store, coalesce_s=-1.0)


def _request(offset: int) -> ChunkRequest:
    return ChunkRequest(
        correlation_id=uuid.uuid4().hex,
        reply_to="fogline/devices/d/inbox/artifacts",
        sha256="a" * 64,
        offset=offset,
        length=CHUNK,
        device_id="d",
        multicast=True,
    )


def test_a_quiet_batch_waits_while_requests_wait_unread() -> None:
    flushed: list[ChunkRequest] = []
    done = threading.Event()
    unread = threading.Event()
    unread.set()  # the service's network thread is behind

    def flush(request: ChunkRequest) -> None:
        flushed.append(request)
        done.set()

    batcher = _Batcher(0.01, 60.0, flush, busy=unread.is_set)
    batcher.start()
    try:
        first = _request(0)
        assert batcher.add(first)
        # Quiet for far longer than its window, but only because input waits unread.
        assert not done.wait(0.3)
        assert not batcher.add(_request(0))  # the late-read request joins the same batch
        unread.clear()
        assert done.wait(10)
    finally:
        batcher.close()
    assert flushed == [first]  # one publish for both


def test_the_limit_still_bounds_a_held_batch() -> None:
    done = threading.Event()
    batcher = _Batcher(0.01, 0.2, lambda _r: done.set(), busy=lambda: True)
    batcher.start()
    try:
        batcher.add(_request(CHUNK))
        assert done.wait(10)  # published although input never stops
    finally:
        batcher.close()


def test_a_bad_chunk_left_by_an_earlier_run_is_fetched_again(
    service_factory: Callable[..., ArtifactService],
    transports: Callable[[], MqttTransport],
    topics: Topics,
    tmp_path: Path,
) -> None:
    """Chunks are written with the hash they came with and checked only through the
    whole file. A run that stopped after writing every chunk but before that check
    leaves a bad chunk on record: the next run finds it and fetches it alone."""
    svc = service_factory(coalesce_s=0.05)
    data = os.urandom(3 * CHUNK)
    sha = svc.store.put_bytes(data)
    device = Device(transports(), topics, tmp_path)
    part = device.store.partial(sha, len(data), CHUNK)
    for index in range(3):
        good = data[index * CHUNK : (index + 1) * CHUNK]
        sent = bytes([good[0] ^ 0xFF]) + good[1:] if index == 1 else good
        part.write(index, sent, claimed_sha256=hashlib.sha256(good).hexdigest())
    part.close()
    assert device.download(sha, len(data)) == data
    assert device.fetcher.bad_chunks == 1
    assert svc.stats()["chunks_served"] + svc.stats()["chunks_multicast"] == 1
