"""Chunked artifact fetch over MQTT, resumable.

The agent sends :class:`ChunkRequest` messages to ``artifacts/{sha}/get`` with its inbox
as ``reply_to``, keeps a window of requests in flight, checks every chunk (offset, size,
hash) on arrival, and writes it into the :class:`PartialArtifact`. Lost replies time
out and are re-requested; while the broker is unreachable it waits instead of burning
retries. The whole-file hash is checked by the caller.

While it downloads, the fetcher also subscribes to ``artifacts/{sha}/chunks`` and marks
its first request for each chunk ``multicast``: the artifact service then answers every
device that asked for that chunk at about the same time with one publish there, which
the broker fans out. Such a chunk is matched by offset (its correlation id is another
device's) and checked exactly like a unicast one. A retry (timeout, bad chunk) asks for
a unicast reply on the inbox, so an old service, a broker whose ACL refuses the
subscription, or a lost multicast costs one timeout and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from fogline.protocol import (
    ArtifactChunk,
    ArtifactError,
    ChunkRequest,
    DecodeError,
    ErrorReply,
    FoglineError,
    MqttMessage,
    MqttTransport,
    Topics,
    decode,
    encode,
)

from ._config import DeliveryConfig
from ._store import PartialArtifact

__all__ = ["ArtifactFetcher", "DownloadStoppedError"]

log = logging.getLogger("fogline.edge.download")

_SYNC_BYTES = 8 * 1024 * 1024
_SYNC_AFTER_S = 0.25


class DownloadStoppedError(Exception):
    """The agent is stopping; the partial download stays on disk for next time."""


@dataclass
class _Pending:
    index: int
    deadline: float
    attempts: int


_Reply = tuple[ArtifactChunk | ErrorReply, bool]  # (reply, arrived by multicast)


class ArtifactFetcher:
    """Fetches artifacts for one agent; replies arrive on its ``inbox/artifacts`` topic,
    or, with ``multicast``, on the artifact's shared ``chunks`` topic."""

    def __init__(
        self,
        transport: MqttTransport,
        topics: Topics,
        device_id: str,
        settings: DeliveryConfig,
        *,
        multicast: bool = True,
    ) -> None:
        self._transport = transport
        self._topics = topics
        self._device_id = device_id
        self._settings = settings
        self._multicast_wanted = multicast
        self.reply_topic = topics.inbox(device_id, "artifacts")
        self._replies: queue.Queue[_Reply] = queue.Queue()
        self._lock = threading.Lock()
        self._active: set[str] = set()  # correlation ids we wait for
        self._fetching: str | None = None  # sha256 whose multicast chunks we take
        self._multicast = False  # subscribed to the current artifact's chunks topic
        self.requests_sent = 0
        self.bad_chunks = 0
        self.multicast_chunks = 0
        self._unsynced_since = 0.0

    def subscribe(self) -> None:
        self._transport.subscribe(self.reply_topic, self._on_reply, qos=1)

    def _on_reply(self, msg: MqttMessage) -> None:
        # Network thread: decode, keep what we asked for, hand it to the fetching thread.
        try:
            reply = decode(msg.payload)
        except DecodeError as exc:
            log.warning("dropped an undecodable artifact reply: %s", exc)
            return
        if not isinstance(reply, ArtifactChunk | ErrorReply):
            log.warning("dropped an unexpected %s on %s", reply.message_type, msg.topic)
            return
        with self._lock:
            if reply.correlation_id not in self._active:
                return  # late duplicate of a retried request
        self._replies.put((reply, False))

    def _on_multicast(self, msg: MqttMessage) -> None:
        try:
            reply = decode(msg.payload, ArtifactChunk)
        except DecodeError as exc:
            log.warning("dropped an undecodable multicast chunk: %s", exc)
            return
        with self._lock:
            if reply.sha256 != self._fetching:
                return  # another artifact's chunk, or we are done
        self._replies.put((reply, True))

    def _subscribe_chunks(self, sha256: str) -> bool:
        if not self._multicast_wanted:
            return False
        try:
            self._transport.subscribe(
                self._topics.artifact_chunks(sha256), self._on_multicast, qos=0, wait=True
            )
        except FoglineError as exc:  # e.g. an ACL without artifacts/+/chunks: unicast only
            log.info("no multicast chunks for %s (%s); unicast only", sha256[:12], exc)
            with contextlib.suppress(FoglineError):
                self._transport.unsubscribe(self._topics.artifact_chunks(sha256))
            return False
        return True

    def _request(
        self, part: PartialArtifact, pending: dict[str, _Pending], index: int, attempts: int
    ) -> None:
        offset, length = part.span(index)
        corr = uuid.uuid4().hex
        request = ChunkRequest(
            correlation_id=corr,
            reply_to=self.reply_topic,
            sha256=part.sha256,
            offset=offset,
            length=length,
            device_id=self._device_id,
            multicast=self._multicast and attempts == 0,
        )
        with self._lock:
            self._active.add(corr)
        pending[corr] = _Pending(index, time.monotonic() + self._settings.chunk_timeout_s, attempts)
        try:
            self._transport.publish(self._topics.artifact_get(part.sha256), encode(request), qos=1)
        except FoglineError:
            self._forget(pending, corr)
            raise
        self.requests_sent += 1

    def _forget(self, pending: dict[str, _Pending], corr: str) -> _Pending | None:
        with self._lock:
            self._active.discard(corr)
        return pending.pop(corr, None)

    def fetch(self, part: PartialArtifact, stop: threading.Event) -> None:
        """Fill every missing chunk of ``part``. Raises :class:`ArtifactError` (with
        ``hash_mismatch`` or ``download_failed`` in the text) or :class:`DownloadStoppedError`."""
        todo = part.missing
        todo.reverse()  # pop() from the end takes the lowest index first
        pending: dict[str, _Pending] = {}
        retries: list[tuple[int, int]] = []  # (index, attempts so far)
        if not todo:
            return
        with self._lock:
            self._fetching = part.sha256
        # Subscribed (acknowledged) before the first request, so no multicast answering
        # it can pass us by.
        self._multicast = self._transport.connected and self._subscribe_chunks(part.sha256)
        try:
            while todo or retries or pending:
                if stop.is_set():
                    raise DownloadStoppedError()
                if not self._transport.connected:
                    # Replies are lost while we are away: re-request everything pending.
                    for corr in list(pending):
                        p = self._forget(pending, corr)
                        if p is not None:
                            retries.append((p.index, p.attempts))
                    self._transport.wait_connected(0.5)
                    continue
                try:
                    while len(pending) < self._settings.window and (retries or todo):
                        index, attempts = retries.pop() if retries else (todo.pop(), 0)
                        self._request(part, pending, index, attempts)
                except FoglineError as exc:  # lost the connection mid-send
                    log.info("chunk request not sent (%s); retrying", exc)
                    retries.append((index, attempts))
                    continue
                self._receive(part, pending, retries)
        finally:
            for corr in list(pending):
                self._forget(pending, corr)
            with self._lock:
                self._fetching = None
            if self._multicast:
                self._multicast = False
                with contextlib.suppress(FoglineError):
                    self._transport.unsubscribe(self._topics.artifact_chunks(part.sha256))

    def _receive(
        self, part: PartialArtifact, pending: dict[str, _Pending], retries: list[tuple[int, int]]
    ) -> None:
        now = time.monotonic()
        next_deadline = min((p.deadline for p in pending.values()), default=now + 0.5)
        try:
            reply, multicast = self._replies.get(timeout=max(0.01, min(next_deadline - now, 0.5)))
        except queue.Empty:
            reply, multicast = None, False
        if reply is not None:
            if multicast:
                assert isinstance(reply, ArtifactChunk)
                p = self._claim(part, pending, reply)
            else:
                p = self._forget(pending, reply.correlation_id)
            if p is not None:
                problem = self._check(part, p.index, reply)
                if problem is None:
                    assert isinstance(reply, ArtifactChunk)
                    # One sync per group of chunks (all of a small artifact in a
                    # burst): flushed when the window is drained, every few MiB, a
                    # moment after the group's first write (a slow link records its
                    # progress as it goes), and on close.
                    if not part.unsynced_bytes:
                        self._unsynced_since = time.monotonic()
                    part.write(p.index, reply.data, sync=False)
                    if (
                        not pending
                        or part.unsynced_bytes >= _SYNC_BYTES
                        or time.monotonic() - self._unsynced_since >= _SYNC_AFTER_S
                    ):
                        part.flush()
                else:
                    self._retry(p, problem, retries)
        now = time.monotonic()
        for corr in [c for c, p in pending.items() if p.deadline <= now]:
            p = self._forget(pending, corr)
            if p is not None:
                self._retry(p, "no reply in time", retries)

    def _claim(
        self, part: PartialArtifact, pending: dict[str, _Pending], chunk: ArtifactChunk
    ) -> _Pending | None:
        """The pending request a multicast chunk answers (by offset), if any."""
        if chunk.sha256 != part.sha256 or chunk.offset % part.chunk_size:
            return None
        index = chunk.offset // part.chunk_size
        corr = next((c for c, p in pending.items() if p.index == index), None)
        if corr is None:
            return None  # not asked for (any more): already written, or not yet requested
        self.multicast_chunks += 1
        return self._forget(pending, corr)

    def _check(
        self, part: PartialArtifact, index: int, reply: ArtifactChunk | ErrorReply
    ) -> str | None:
        if isinstance(reply, ErrorReply):
            return f"artifact service answered {reply.code}: {reply.message}"
        offset, length = part.span(index)
        if reply.sha256 != part.sha256 or reply.offset != offset or len(reply.data) != length:
            self.bad_chunks += 1
            return f"chunk {index} came back with the wrong artifact, offset or size"
        if reply.total_size != part.size:
            self.bad_chunks += 1
            return f"chunk {index} claims total size {reply.total_size}; manifest: {part.size}"
        if hashlib.sha256(reply.data).hexdigest() != reply.chunk_sha256:
            self.bad_chunks += 1
            return f"hash_mismatch: chunk {index} does not match its sha256"
        return None

    def _retry(self, p: _Pending, problem: str, retries: list[tuple[int, int]]) -> None:
        if p.attempts >= self._settings.chunk_retries:
            reason = "hash_mismatch" if problem.startswith("hash_mismatch") else "download_failed"
            raise ArtifactError(
                f"{reason}: chunk {p.index} failed {p.attempts + 1} times; last: {problem}"
            )
        log.info("chunk %d: %s; retrying", p.index, problem)
        retries.append((p.index, p.attempts + 1))
