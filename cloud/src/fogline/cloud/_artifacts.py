"""The artifact service: answers chunk requests from the content-addressed store.

It subscribes to every ``artifacts/{sha256}/get`` topic (through a shared subscription
when it runs as several replicas), and replies on the request's ``reply_to`` with
:class:`ArtifactChunk` messages, each carrying its own sha256. It never pushes unasked.
Requests are handed to a small thread pool so the MQTT network thread stays free.

During a rollout every device asks for the same few chunks, so the service keeps
recently served artifacts in memory (bounded, least recently used first out; each is
checked against its sha256 once when loaded) together with each chunk's hash: a request
costs no disk read and no hashing. Chunk replies go out at QoS 0: the device verifies
every chunk and re-requests any that does not arrive, so broker acknowledgements would
only add round trips. Error replies stay at QoS 1.

Request coalescing: in a rollout N devices ask for the same pieces within a second or
two, and N unicast copies through this one connection were most of the rollout's time.
A request with ``multicast`` set (its sender is subscribed to
``artifacts/{sha256}/chunks`` while it downloads) joins a batch for its (sha256, offset,
length); the batch goes out ONCE on that topic, and the broker copies it to every
subscriber, when no request has joined it for ``coalesce_s`` or ``coalesce_max_s`` after
it opened, whichever comes first (a lone device waits ``coalesce_s``; a burst is not
cut into many batches, each of which every waiting subscriber would receive). The
encoded multicast messages of recent pieces are kept: a second batch costs no encoding.
Still nothing is pushed unasked: a piece is published only because a device asked for
it. Devices verify every piece as before and fall back to unicast requests on timeout.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from fogline.protocol import (
    MAX_CHUNK_SIZE,
    ArtifactChunk,
    ArtifactError,
    ChunkRequest,
    DecodeError,
    ErrorReply,
    FoglineError,
    MqttMessage,
    MqttTransport,
    TopicError,
    Topics,
    decode,
    encode,
)

from ._store import ArtifactStore

__all__ = ["ArtifactService"]

log = logging.getLogger("fogline.cloud.artifacts")

_CACHE_BYTES = 256 * 1024 * 1024
_COALESCE_S = 0.05
_COALESCE_MAX_S = 1.0
_MULTICAST_ID = "multicast"  # a multicast chunk answers many requests: no one's id
_ENCODED_PIECES = 32


class _ArtifactCache:
    """Whole artifacts in memory, verified once, plus the hash of every piece served."""

    def __init__(self, store: ArtifactStore, max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._bytes = 0

    def get(self, sha256: str) -> bytes:
        """The artifact's bytes; :class:`ArtifactError` if missing or corrupt."""
        with self._lock:
            data = self._data.get(sha256)
            if data is not None:
                self._data.move_to_end(sha256)
                return data
            # Loading under the lock: a rollout's first requests all want the same
            # artifact, and one read beats N concurrent ones.
            data = self._store.read(sha256)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ArtifactError(f"artifact {sha256} is corrupt in the store")
            if len(data) <= self._max_bytes:
                self._data[sha256] = data
                self._bytes += len(data)
                while self._bytes > self._max_bytes:
                    old_sha, old = self._data.popitem(last=False)
                    self._bytes -= len(old)
                    self._hashes = {k: v for k, v in self._hashes.items() if k[0] != old_sha}
            return data

    def piece_hash(self, sha256: str, offset: int, piece: bytes) -> str:
        key = (sha256, offset, len(piece))
        digest = self._hashes.get(key)
        if digest is None:
            digest = hashlib.sha256(piece).hexdigest()
            with self._lock:
                if sha256 in self._data:  # never grow the table for an evicted artifact
                    self._hashes[key] = digest
        return digest


class ArtifactService:
    """Serve artifacts over MQTT. ``start()`` subscribes; ``close()`` stops serving."""

    def __init__(
        self,
        transport: MqttTransport,
        store: ArtifactStore,
        *,
        topics: Topics | None = None,
        share_group: str | None = None,
        max_reply_bytes: int = MAX_CHUNK_SIZE,
        workers: int = 4,
        cache_bytes: int = _CACHE_BYTES,
        coalesce_s: float = _COALESCE_S,
        coalesce_max_s: float = _COALESCE_MAX_S,
    ) -> None:
        if not 0 < max_reply_bytes <= MAX_CHUNK_SIZE:
            raise ValueError(f"max_reply_bytes must be in 1..{MAX_CHUNK_SIZE}")
        if not 0 <= coalesce_s <= coalesce_max_s <= 10:
            raise ValueError("need 0 <= coalesce_s <= coalesce_max_s <= 10 seconds")
        self.transport = transport
        self.store = store
        self.topics = topics or Topics()
        self.max_reply_bytes = max_reply_bytes
        self._filter = self.topics.all_artifact_gets()
        if share_group:
            self._filter = f"$share/{share_group}/{self._filter}"
        self._workers = workers
        self._cache = _ArtifactCache(store, cache_bytes)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._batcher = _Batcher(
            coalesce_s, coalesce_max_s, self._multicast, busy=self._requests_unread
        )
        self._encoded: OrderedDict[tuple[str, int, int], list[bytes]] = OrderedDict()
        self.chunks_served = 0
        self.chunks_multicast = 0
        self.requests_coalesced = 0
        self.errors_replied = 0
        self.dropped = 0

    @property
    def name(self) -> str:
        return "artifact-service"

    def start(self) -> None:
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fogline-artifacts")
        self._batcher.start()
        self.transport.subscribe(self._filter, self._on_message, qos=1)
        log.info("artifact service listening on %s", self._filter)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self.transport.unsubscribe(self._filter)
        pool.shutdown(wait=True, cancel_futures=True)
        self._batcher.close()  # unsent batches are dropped: devices re-request on timeout

    def __enter__(self) -> ArtifactService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handling (network thread → pool) -----------------------------------------------
    def _on_message(self, msg: MqttMessage) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            pool.submit(self._handle, msg)
        except RuntimeError:  # shutting down
            self._count("dropped")

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def _handle(self, msg: MqttMessage) -> None:
        try:
            self._serve(msg)
        except Exception:  # keep serving whatever one request did
            self._count("dropped")
            log.exception("artifact request on %s failed", msg.topic)

    def _serve(self, msg: MqttMessage) -> None:
        try:
            request = decode(msg.payload, ChunkRequest)
        except DecodeError as exc:
            self._reject_malformed(msg, exc)
            return
        try:
            topic_sha = self.topics.parse(msg.topic).sha256
        except TopicError:
            topic_sha = None
        if topic_sha != request.sha256:
            self._error(
                request.reply_to,
                request.correlation_id,
                "protocol_error",
                f"request for {request.sha256} arrived on {msg.topic}",
            )
            return
        if not self.store.has(request.sha256):
            self._error(
                request.reply_to,
                request.correlation_id,
                "unknown_artifact",
                f"no artifact {request.sha256}",
            )
            return
        try:
            artifact = self._cache.get(request.sha256)
        except FoglineError as exc:
            self._error(request.reply_to, request.correlation_id, exc.code, exc.message)
            return
        total = len(artifact)
        if request.offset >= total:
            message = f"offset {request.offset} is outside artifact {request.sha256} ({total} B)"
            self._error(request.reply_to, request.correlation_id, ArtifactError.code, message)
            return
        if request.multicast:
            if not self._batcher.add(request):
                self._count("requests_coalesced")
            return
        for chunk in self._pieces(request, artifact):
            self.transport.publish(request.reply_to, encode(chunk), qos=0)
            self._count("chunks_served")

    def _pieces(self, request: ChunkRequest, artifact: bytes) -> list[ArtifactChunk]:
        total = len(artifact)
        end = min(request.offset + request.length, total)
        chunks = []
        for start in range(request.offset, end, self.max_reply_bytes):
            piece = artifact[start : min(start + self.max_reply_bytes, end)]
            chunks.append(
                ArtifactChunk(
                    correlation_id=request.correlation_id,
                    sha256=request.sha256,
                    offset=start,
                    total_size=total,
                    chunk_sha256=self._cache.piece_hash(request.sha256, start, piece),
                    data=piece,
                )
            )
        return chunks

    def _requests_unread(self) -> bool:
        """Requests may be waiting in our connection, unread (a busy network thread)."""
        return self.transport.input_backlog() > 0

    def _multicast(self, request: ChunkRequest) -> None:
        """Publish one batch (batcher thread): the first request stands for them all."""
        key = (request.sha256, request.offset, request.length)
        try:
            payloads = self._encoded.get(key)
            if payloads is None:
                artifact = self._cache.get(request.sha256)
                anon = request.model_copy(update={"correlation_id": _MULTICAST_ID})
                payloads = [encode(chunk) for chunk in self._pieces(anon, artifact)]
                self._encoded[key] = payloads
                while len(self._encoded) > _ENCODED_PIECES:
                    self._encoded.popitem(last=False)
            self._encoded.move_to_end(key)
            topic = self.topics.artifact_chunks(request.sha256)
            for payload in payloads:
                self.transport.publish(topic, payload, qos=0)
                self._count("chunks_multicast")
        except FoglineError as exc:  # devices time out and re-request by unicast
            self._count("dropped")
            log.warning("multicast of %s@%d failed: %s", request.sha256, request.offset, exc)

    def _reject_malformed(self, msg: MqttMessage, exc: DecodeError) -> None:
        reply_to, correlation_id = _salvage_reply(msg.payload)
        if reply_to is None or correlation_id is None:
            self._count("dropped")
            log.warning("dropped malformed chunk request on %s: %s", msg.topic, exc.message)
            return
        self._error(reply_to, correlation_id, exc.code, exc.message)

    def _error(self, reply_to: str, correlation_id: str, code: str, message: str) -> None:
        reply = ErrorReply(correlation_id=correlation_id, code=code, message=message[:2048])
        self.transport.publish(reply_to, encode(reply), qos=1)
        self._count("errors_replied")
        log.info("chunk request %s refused: %s: %s", correlation_id, code, message)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "chunks_served": self.chunks_served,
                "chunks_multicast": self.chunks_multicast,
                "requests_coalesced": self.requests_coalesced,
                "errors_replied": self.errors_replied,
                "dropped": self.dropped,
            }


class _Batcher:
    """Requests for the same piece become one batch, published (by ``flush``, on this
    batcher's thread) once no request joined it for ``quiet`` seconds, or ``limit``
    seconds after it opened.

    "No request joined" must mean none came, not that none was read: a service whose
    network thread is slow (a loaded host; in the benchmark, 200 agents in its process)
    left requests unread in its socket for a quiet window, published, and the requests
    read next opened a new batch, which every device still fetching received (10-30
    publishes of a 1 MiB chunk instead of 1 at N = 200, seen send -> read delays of
    1-2 s). While ``busy()`` says input waits unread, a quiet batch waits a little
    longer (``limit`` still bounds it)."""

    _RECHECK_S = 0.01

    def __init__(
        self,
        quiet: float,
        limit: float,
        flush: Callable[[ChunkRequest], None],
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._quiet = quiet
        self._limit = limit
        self._flush = flush
        self._busy = busy
        self._cond = threading.Condition()
        # key -> [first request, opened at, last joined at]
        self._open: dict[tuple[str, int, int], tuple[ChunkRequest, float, float]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        with self._cond:
            self._closed = False
            self._open.clear()
        self._thread = threading.Thread(target=self._run, name="fogline-artifacts-batch")
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def add(self, request: ChunkRequest) -> bool:
        """True if this request opened a new batch; False if it joined an open one."""
        key = (request.sha256, request.offset, request.length)
        now = time.monotonic()
        with self._cond:
            batch = self._open.get(key)
            if batch is not None:
                self._open[key] = (batch[0], batch[1], now)
                return False
            self._open[key] = (request, now, now)
            self._cond.notify_all()
            return True

    def _due_at(self, batch: tuple[ChunkRequest, float, float]) -> float:
        return min(batch[2] + self._quiet, batch[1] + self._limit)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    due = [(self._due_at(b), k) for k, b in self._open.items()]
                    ready = [k for at, k in due if at <= now]
                    if ready and self._busy():
                        # Quiet only because requests wait unread: hold those batches.
                        held = [k for k in ready if self._open[k][1] + self._limit > now]
                        if held:
                            ready = [k for k in ready if k not in held]
                            due = [(now + self._RECHECK_S, k) for k in held] + [
                                d for d in due if d[1] not in held
                            ]
                    if ready:
                        # Closed before publishing: a request arriving from now on opens
                        # a new batch, so no device can miss the publish it asked for.
                        requests = [self._open.pop(k)[0] for k in ready]
                        break
                    self._cond.wait(min(at for at, _ in due) - now if due else None)
            for request in requests:
                try:
                    self._flush(request)
                except Exception:
                    log.exception("artifact multicast failed")


def _salvage_reply(payload: bytes) -> tuple[str | None, str | None]:
    """Best effort: the reply topic and correlation id of a request that did not
    validate, if both are well-formed, so the requester learns why."""
    try:
        raw: Any = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=1 << 20, ext_hook=_no_ext
        )
        body = raw["body"]
        reply_to, correlation_id = body["reply_to"], body["correlation_id"]
        probe = ErrorReply(correlation_id=correlation_id, code="decode_error", message="")
        if (
            not isinstance(reply_to, str)
            or not reply_to
            or len(reply_to) > 256
            or any(c in reply_to for c in "+#\x00")
        ):
            return None, None
        return reply_to, probe.correlation_id
    except Exception:
        return None, None


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError("extension types are not allowed")
