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
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
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
    ) -> None:
        if not 0 < max_reply_bytes <= MAX_CHUNK_SIZE:
            raise ValueError(f"max_reply_bytes must be in 1..{MAX_CHUNK_SIZE}")
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
        self.chunks_served = 0
        self.errors_replied = 0
        self.dropped = 0

    @property
    def name(self) -> str:
        return "artifact-service"

    def start(self) -> None:
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fogline-artifacts")
        self.transport.subscribe(self._filter, self._on_message, qos=1)
        log.info("artifact service listening on %s", self._filter)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self.transport.unsubscribe(self._filter)
        pool.shutdown(wait=True, cancel_futures=True)

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
        end = min(request.offset + request.length, total)
        for start in range(request.offset, end, self.max_reply_bytes):
            piece = artifact[start : min(start + self.max_reply_bytes, end)]
            chunk = ArtifactChunk(
                correlation_id=request.correlation_id,
                sha256=request.sha256,
                offset=start,
                total_size=total,
                chunk_sha256=self._cache.piece_hash(request.sha256, start, piece),
                data=piece,
            )
            self.transport.publish(request.reply_to, encode(chunk), qos=0)
            self._count("chunks_served")

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
                "errors_replied": self.errors_replied,
                "dropped": self.dropped,
            }


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
