"""Chunked artifact fetch over MQTT, resumable.

The agent sends :class:`ChunkRequest` messages to ``artifacts/{sha}/get`` with its inbox
as ``reply_to``, keeps a window of requests in flight, checks every chunk (artifact,
offset, size) on arrival, and writes it into the :class:`PartialArtifact` with the
sha256 it came with. Lost replies time out and are re-requested; while the broker is
unreachable it waits instead of burning retries.

Each byte is hashed once: the chunks go into the whole-file hash as they are written,
and once every chunk is there the file is checked against the artifact's sha256. Only
if that fails are the chunks checked one by one against their own hashes
(:meth:`PartialArtifact.bad_chunks`); the bad ones are fetched again (unicast, counting
as retries, as a failed per-chunk check on arrival did), the rest stay. The caller
checks the whole-file hash again before installing (the result is kept: no new pass).

While it downloads, the fetcher also subscribes to ``artifacts/{sha}/chunks`` and marks
its first request for each chunk ``multicast``: the artifact service then answers every
device that asked for that chunk at about the same time with one publish there, which
the broker fans out. Such a chunk is matched by offset (its correlation id is another
device's) and checked exactly like a unicast one. A multicast chunk the fetcher has not
requested yet (another device's batch that came first) is taken just the same and is
then not requested at all, and the fetcher leaves the chunks topic as soon as it has
every chunk: in a rollout each batch reaches every device still subscribed, so a device
that lingers receives other devices' late batches for nothing. A retry (timeout, bad
chunk) asks for a unicast reply on the inbox, so an old service, a broker whose ACL
refuses the subscription, or a lost multicast costs one timeout and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

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


@dataclass
class _Fetch:
    """One download's bookkeeping: chunks not requested yet (lowest index last), to
    request again (index, attempts so far), and requests in flight by correlation id."""

    part: PartialArtifact
    todo: list[int]
    retries: list[tuple[int, int]] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)  # index -> attempts before it

    @property
    def wanted(self) -> bool:
        return bool(self.todo or self.retries or self.pending)


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
        self._chunks_topic: str | None = None  # ... and their topic, while subscribed
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
        # Every device still fetching receives every batch of the artifact; most of a
        # late batch is not for us. The topic says which artifact it is: no decode then.
        with self._lock:
            if msg.topic != self._chunks_topic:
                return  # another artifact's chunks, or we are done
        try:
            reply = decode(msg.payload, ArtifactChunk)
        except DecodeError as exc:
            log.warning("dropped an undecodable multicast chunk: %s", exc)
            return
        with self._lock:
            if reply.sha256 != self._fetching:
                return
        self._replies.put((reply, True))

    def _subscribe_chunks(self, sha256: str) -> bool:
        if not self._multicast_wanted:
            return False
        topic = self._topics.artifact_chunks(sha256)
        with self._lock:
            self._chunks_topic = topic
        try:
            self._transport.subscribe(topic, self._on_multicast, qos=0, wait=True)
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
        """Fill every missing chunk of ``part``, until the file matches its sha256 or no
        chunk can be blamed for it (the caller's whole-file check then fails). Raises
        :class:`ArtifactError` (with ``hash_mismatch`` or ``download_failed`` in the
        text) or :class:`DownloadStoppedError`. Also with no chunk missing: chunks an
        earlier run wrote unchecked (it stopped before the whole-file check) are checked
        now, and the bad ones fetched again."""
        todo = part.missing
        todo.reverse()  # pop() from the end takes the lowest index first
        state = _Fetch(part, todo)
        while True:
            if state.wanted:
                self._fetch_missing(state, stop)
            if part.file_sha256() == part.sha256:
                return
            bad = part.bad_chunks()
            if not bad:
                return
            for index in bad:
                self.bad_chunks += 1
                attempts = state.written.pop(index, 0)
                problem = f"hash_mismatch: chunk {index} does not match its sha256"
                self._retry(_Pending(index, 0.0, attempts), problem, state.retries)

    def _fetch_missing(self, state: _Fetch, stop: threading.Event) -> None:
        part = state.part
        with self._lock:
            self._fetching = part.sha256
        # Subscribed (acknowledged) before the first request, so no multicast answering
        # it can pass us by. Chunks fetched again are asked for unicast: no need then.
        self._multicast = (
            bool(state.todo) and self._transport.connected and self._subscribe_chunks(part.sha256)
        )
        try:
            while state.wanted:
                if stop.is_set():
                    raise DownloadStoppedError()
                if not self._transport.connected:
                    # Replies are lost while we are away: re-request everything pending.
                    for corr in list(state.pending):
                        p = self._forget(state.pending, corr)
                        if p is not None:
                            state.retries.append((p.index, p.attempts))
                    self._transport.wait_connected(0.5)
                    continue
                # Chunks that came in meanwhile (another device's batch, in a rollout
                # often before our own request went out) need no request.
                self._receive(state, block=False)
                if not state.wanted:
                    break
                index, attempts = -1, 0
                try:
                    while len(state.pending) < self._settings.window and (
                        state.retries or state.todo
                    ):
                        if state.retries:
                            index, attempts = state.retries.pop()
                        else:
                            index, attempts = state.todo.pop(), 0
                        self._request(part, state.pending, index, attempts)
                except FoglineError as exc:  # lost the connection mid-send
                    log.info("chunk request not sent (%s); retrying", exc)
                    state.retries.append((index, attempts))
                    continue
                self._receive(state, block=True)
        finally:
            for corr in list(state.pending):
                self._forget(state.pending, corr)
            self._leave_chunks(part.sha256)

    def _leave_chunks(self, sha256: str) -> None:
        """Stop taking (and receiving) the artifact's multicast chunks."""
        with self._lock:
            self._fetching = None
            self._chunks_topic = None
        if self._multicast:
            self._multicast = False
            with contextlib.suppress(FoglineError):
                self._transport.unsubscribe(self._topics.artifact_chunks(sha256))

    def _receive(self, state: _Fetch, *, block: bool) -> None:
        """Apply the replies that are here (with ``block``, wait for one first, until the
        next request's deadline), then re-request what timed out."""
        first = True
        while True:
            try:
                if first and block:
                    now = time.monotonic()
                    next_deadline = min(
                        (p.deadline for p in state.pending.values()), default=now + 0.5
                    )
                    wait = max(0.01, min(next_deadline - now, 0.5))
                    reply, multicast = self._replies.get(timeout=wait)
                else:
                    reply, multicast = self._replies.get_nowait()
            except queue.Empty:
                break
            first = False
            self._apply(state, reply, multicast)
            if not state.wanted:
                break
        now = time.monotonic()
        for corr in [c for c, p in state.pending.items() if p.deadline <= now]:
            p = self._forget(state.pending, corr)
            if p is not None:
                self._retry(p, "no reply in time", state.retries)

    def _apply(self, state: _Fetch, reply: ArtifactChunk | ErrorReply, multicast: bool) -> None:
        part = state.part
        asked = True
        if multicast:
            assert isinstance(reply, ArtifactChunk)
            p, asked = self._claim(state, reply)
        else:
            p = self._forget(state.pending, reply.correlation_id)
        if p is None:
            return
        problem = self._check(part, p.index, reply)
        if problem is not None:
            if asked:  # ask again, for a unicast reply
                self._retry(p, problem, state.retries)
            elif p.attempts:  # not asked for (yet): fetch it as planned
                state.retries.append((p.index, p.attempts))
            else:
                state.todo.append(p.index)
            return
        assert isinstance(reply, ArtifactChunk)
        if multicast:
            self.multicast_chunks += 1
        if not state.wanted:
            # The last chunk: leave the chunks topic before writing, so that later
            # batches (other devices' late requests) no longer come our way.
            self._leave_chunks(part.sha256)
        # One sync per group of chunks (all of a small artifact in a burst): flushed
        # when nothing is pending any more, every few MiB, a moment after the group's
        # first write (a slow link records its progress as it goes), and on close.
        if not part.unsynced_bytes:
            self._unsynced_since = time.monotonic()
        part.write(p.index, reply.data, sync=False, claimed_sha256=reply.chunk_sha256)
        state.written[p.index] = p.attempts
        if (
            not state.pending
            or part.unsynced_bytes >= _SYNC_BYTES
            or time.monotonic() - self._unsynced_since >= _SYNC_AFTER_S
        ):
            part.flush()

    def _claim(self, state: _Fetch, chunk: ArtifactChunk) -> tuple[_Pending | None, bool]:
        """What a multicast chunk fills (by offset), and whether we asked for it: a
        pending request, or a chunk not requested (again) yet, which then needs none."""
        part = state.part
        if chunk.sha256 != part.sha256 or chunk.offset % part.chunk_size:
            return None, False
        index = chunk.offset // part.chunk_size
        corr = next((c for c, p in state.pending.items() if p.index == index), None)
        if corr is not None:
            return self._forget(state.pending, corr), True
        if index in state.todo:
            state.todo.remove(index)
            return _Pending(index, 0.0, 0), False
        retry = next((r for r in state.retries if r[0] == index), None)
        if retry is not None:
            state.retries.remove(retry)
            return _Pending(index, 0.0, retry[1]), False
        return None, False  # already written, or not part of this artifact

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
        # Its own sha256 is checked only if the whole file fails (see fetch).
        return None

    def _retry(self, p: _Pending, problem: str, retries: list[tuple[int, int]]) -> None:
        if p.attempts >= self._settings.chunk_retries:
            reason = "hash_mismatch" if problem.startswith("hash_mismatch") else "download_failed"
            raise ArtifactError(
                f"{reason}: chunk {p.index} failed {p.attempts + 1} times; last: {problem}"
            )
        log.info("chunk %d: %s; retrying", p.index, problem)
        retries.append((p.index, p.attempts + 1))
