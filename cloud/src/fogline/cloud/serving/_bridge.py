"""The MQTT bridge in front of the Serve deployments. No Ray import: it talks to any
handle whose ``remote(inputs)`` returns an awaitable (a Serve ``DeploymentResponse``).

For each message on ``infer/+/requests`` (``$share/<group>/...`` when several bridges
run as replicas), on the MQTT network thread, only cheap checks run:

- undecodable: an ``ErrorReply(decode_error)`` if a reply topic (a device inbox) and a
  correlation id can still be read from the payload, else dropped and counted;
- a ``reply_to`` that is not a device inbox under our prefix: dropped and counted (the
  bridge must not be a way to publish on arbitrary topics);
- deadline already passed: ``ErrorReply(deadline_exceeded)`` at once, Serve not called;
- a model (or version) not served here: ``ErrorReply(unknown_model)``;
- a probe (the only input is the empty ``fogline.probe`` tensor): answered at once with
  an empty ``InferenceResponse`` whose ``service_ms`` is how long a request arriving now
  would spend in the cloud (from the batcher's queue and running estimates; the running
  average of answered requests for an unbatched handle);
- too many requests in flight: ``ErrorReply(over_capacity)``.

Everything else is handed to an asyncio loop on the bridge's own thread, which awaits
the Serve call (bounded by the request's deadline) and replies ``InferenceResponse``
or ``ErrorReply`` on ``reply_to`` with the request's correlation id.

An answer's ``service_ms`` is the time the request spent in the cloud: from the bridge
receiving it to the bridge replying (waiting for a batch, the Serve call, the run). The
device subtracts it from its round trip to learn the network's share, and adds the two
to estimate a cloud request's completion time, so queueing in the cloud shows in the
estimate and the device offloads less when the cloud is busy.

A handle that also has ``remote_batch`` (a :class:`BatchServeHandle`, as
``deploy_model`` returns) gets its requests through a :class:`ModelBatcher`: one Serve
call per batch rather than per request, which is what lets the cloud keep up under load
on few cores. A plain :class:`ServeHandle` is called once per request.

Requests and replies travel at QoS 0: a lost message is a timeout the client already
handles, and a late redelivery would be useless past the deadline anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgpack
import numpy as np

from fogline.protocol import (
    DecodeError,
    ErrorReply,
    FoglineError,
    InferenceRequest,
    InferenceResponse,
    Message,
    MqttMessage,
    MqttTransport,
    Tensor,
    TopicError,
    Topics,
    decode,
    encode,
    validate_id,
)

from ._batcher import ModelBatcher

__all__ = [
    "PROBE_INPUT",
    "BatchServeHandle",
    "BridgeStats",
    "InferenceBridge",
    "ServeHandle",
    "ServedModel",
]

log = logging.getLogger("fogline.cloud.bridge")

PROBE_INPUT = "fogline.probe"
"""Mirrors ``fogline.edge.PROBE_INPUT`` (the cloud does not import the edge)."""


class ServeHandle(Protocol):
    def remote(self, inputs: dict[str, np.ndarray]) -> Awaitable[Any]: ...


@runtime_checkable
class BatchServeHandle(Protocol):
    """A handle that can also take many requests in one call; ``remote_batch`` resolves
    to one result per input, in order."""

    def remote(self, inputs: dict[str, np.ndarray]) -> Awaitable[Any]: ...

    def remote_batch(self, batch: list[dict[str, np.ndarray]]) -> Awaitable[Any]: ...


@dataclass(frozen=True)
class ServedModel:
    version: int
    handle: ServeHandle


@dataclass
class BridgeStats:
    received: int = 0
    forwarded: int = 0  # requests handed to Serve
    serve_calls: int = 0  # Serve calls made (fewer than forwarded when batched)
    answered: int = 0
    errors: int = 0  # error replies sent
    expired: int = 0
    probes: int = 0
    malformed: int = 0
    dropped: int = 0  # malformed with no readable reply topic
    over_capacity: int = 0


async def _resolve(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class InferenceBridge:
    """Serve ``handles`` (model name -> :class:`ServedModel`, or anything with
    ``version`` and ``handle``) behind MQTT."""

    def __init__(
        self,
        transport: MqttTransport,
        handles: Mapping[str, ServedModel],
        topics: Topics | None = None,
        shared_group: str | None = None,
        *,
        max_in_flight: int = 256,
        default_timeout_s: float = 10.0,
        max_batch: int = 32,
        max_concurrent_batches: int = 2,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.topics = topics or Topics()
        self.handles = dict(handles)
        self.shared_group = validate_id(shared_group, "shared group") if shared_group else None
        self.max_in_flight = max_in_flight
        self.default_timeout_s = default_timeout_s
        self.max_batch = max_batch
        self.max_concurrent_batches = max_concurrent_batches
        self.stats = BridgeStats()
        self._batchers: dict[str, ModelBatcher] = {}  # used on the bridge loop only
        self._alpha = alpha
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._service_ms: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def topic_filter(self) -> str:
        base = self.topics.all_infer_requests()
        return f"$share/{self.shared_group}/{base}" if self.shared_group else base

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def service_ms(self, model: str) -> float | None:
        with self._lock:
            return self._service_ms.get(model)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fogline-bridge", daemon=True)
        self._thread.start()
        ready.wait()
        self.transport.subscribe(self.topic_filter, self._on_request, qos=0)
        log.info("inference bridge serving %s on %s", sorted(self.handles), self.topic_filter)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests, let those in flight finish (up to ``timeout_s``), stop."""
        if self._thread is None or self._loop is None:
            return
        try:
            self.transport.unsubscribe(self.topic_filter)
        except FoglineError:
            log.debug("unsubscribe on close failed", exc_info=True)
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._thread = None
        self._loop = None

    def __enter__(self) -> InferenceBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- network thread: cheap checks only ---------------------------------------------------
    def _on_request(self, msg: MqttMessage) -> None:
        received = time.monotonic()
        with self._lock:
            self.stats.received += 1
        try:
            request = decode(msg.payload, InferenceRequest)
            topic_model = self.topics.parse(msg.topic).model
            if topic_model != request.model:
                raise DecodeError(f"topic names model {topic_model!r}, body {request.model!r}")
        except (DecodeError, TopicError) as exc:
            self._malformed(msg.payload, exc.message)
            return
        if not self._is_inbox(request.reply_to):
            # Never publish where a request says: that would let anyone inject messages
            # on, say, a desired-state topic through the bridge.
            self._count("malformed")
            self._count("dropped")
            log.warning(
                "request %s dropped: reply_to %r is not a device inbox",
                request.correlation_id,
                request.reply_to,
            )
            return
        if request.deadline is not None and request.deadline <= self._clock():
            self._count("expired")
            self._error(request, "deadline_exceeded", "the deadline passed before the cloud got it")
            return
        served = self.handles.get(request.model)
        if served is None or (request.version is not None and request.version != served.version):
            wanted = request.model + (f" v{request.version}" if request.version else "")
            self._error(request, "unknown_model", f"{wanted} is not served here")
            return
        if self._is_probe(request):
            self._count("probes")
            probe_reply = InferenceResponse(
                correlation_id=request.correlation_id,
                model=request.model,
                version=served.version,
                outputs={},
                service_ms=self._expected_ms(request.model),
            )
            self._reply(request.reply_to, probe_reply)
            return
        with self._lock:
            full = self._in_flight >= self.max_in_flight
            if not full:
                self._in_flight += 1
        if full:
            self._count("over_capacity")
            self._error(request, "over_capacity", f"{self.max_in_flight} requests in flight")
            return
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._forward(request, served, received), self._loop)

    @staticmethod
    def _is_probe(request: InferenceRequest) -> bool:
        probe = request.inputs.get(PROBE_INPUT)
        return len(request.inputs) == 1 and probe is not None and probe.shape == [0]

    # -- bridge loop: the Serve call ------------------------------------------------------------
    def _expected_ms(self, model: str) -> float:
        """What a request for ``model`` arriving now would spend in the cloud, for
        probes: the batcher's view of its queue (so the figure falls as soon as a
        backlog clears), else the running average (0 until measured)."""
        batcher = self._batchers.get(model)
        if batcher is not None and batcher.calls:
            return batcher.expected_s() * 1000.0
        return self.service_ms(model) or 0.0

    async def _forward(
        self, request: InferenceRequest, served: ServedModel, received: float
    ) -> None:
        try:
            inputs = {name: t.to_numpy() for name, t in request.inputs.items()}
            timeout = (
                request.deadline - self._clock()
                if request.deadline is not None
                else self.default_timeout_s
            )
            if timeout <= 0:
                self._count("expired")
                self._error(request, "deadline_exceeded", "the deadline passed in the bridge")
                return
            self._count("forwarded")
            try:
                result = await self._call_serve(request.model, served, inputs, timeout)
            except TimeoutError:
                self._error(request, "deadline_exceeded", "Serve did not answer in time")
                return
            except Exception as exc:  # Ray's errors (replica died...), translated here only
                log.warning("Serve call for %s failed: %s", request.model, exc)
                why = f"Serve call failed: {type(exc).__name__}"
                self._error(request, "cloud_unavailable", why)
                return
            self._answer(request, served, result, received)
        except Exception:
            log.exception("bridge failed on request %s", request.correlation_id)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _call_serve(
        self, model: str, served: ServedModel, inputs: dict[str, np.ndarray], timeout: float
    ) -> Any:
        handle = served.handle
        if not isinstance(handle, BatchServeHandle):
            self._count("serve_calls")
            return await asyncio.wait_for(_resolve(handle.remote(inputs)), timeout)
        batcher = self._batchers.get(model)
        if batcher is None or batcher.key is not handle:  # new model, or a new version
            batcher = ModelBatcher(
                self._batch_call(handle),
                max_batch=self.max_batch,
                max_calls=self.max_concurrent_batches,
                hang_timeout_s=self.default_timeout_s,
                key=handle,
            )
            self._batchers[model] = batcher
        future = batcher.submit(inputs, timeout)
        try:
            # On timeout wait_for cancels the future: the batcher then skips the request.
            return await asyncio.wait_for(future, timeout)
        finally:
            future.cancel()

    def _batch_call(
        self, handle: BatchServeHandle
    ) -> Callable[[list[dict[str, np.ndarray]]], Awaitable[Any]]:
        def call(batch: list[dict[str, np.ndarray]]) -> Awaitable[Any]:
            self._count("serve_calls")
            return handle.remote_batch(batch)

        return call

    def _answer(
        self, request: InferenceRequest, served: ServedModel, result: Any, received: float
    ) -> None:
        if not isinstance(result, dict):
            self._error(request, "cloud_unavailable", "Serve returned an unexpected value")
            return
        if "error" in result:
            self._error(request, str(result["error"]), str(result.get("message", "")))
            return
        service_ms = (time.monotonic() - received) * 1000.0
        try:
            outputs = {
                name: Tensor.from_numpy(np.asarray(v)) for name, v in result["outputs"].items()
            }
        except FoglineError as exc:
            self._error(request, exc.code, exc.message)
            return
        with self._lock:
            old = self._service_ms.get(request.model)
            self._service_ms[request.model] = (
                service_ms if old is None else old + self._alpha * (service_ms - old)
            )
        response = InferenceResponse(
            correlation_id=request.correlation_id,
            model=request.model,
            version=served.version,
            outputs=outputs,
            service_ms=service_ms,
        )
        if self._reply(request.reply_to, response):
            self._count("answered")

    # -- replies ---------------------------------------------------------------------------------
    def _error(self, request: InferenceRequest, code: str, message: str) -> None:
        reply = ErrorReply(correlation_id=request.correlation_id, code=code, message=message[:2048])
        if self._reply(request.reply_to, reply):
            self._count("errors")

    def _malformed(self, payload: bytes, why: str) -> None:
        self._count("malformed")
        salvaged = self._salvage(payload)
        if salvaged is None:
            self._count("dropped")
            log.warning("malformed inference request dropped: %s", why)
            return
        reply_to, correlation_id = salvaged
        log.warning("malformed inference request %s: %s", correlation_id, why)
        reply = ErrorReply(correlation_id=correlation_id, code="decode_error", message=why[:2048])
        if self._reply(reply_to, reply):
            self._count("errors")

    def _salvage(self, payload: bytes) -> tuple[str, str] | None:
        """Read ``reply_to`` and ``correlation_id`` from a payload that did not decode.
        Replies only go to a device inbox, never to an arbitrary topic."""
        try:
            raw = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_no_ext)
            body = raw["body"]
            reply_to, correlation_id = body["reply_to"], body["correlation_id"]
            if not isinstance(reply_to, str) or not isinstance(correlation_id, str):
                return None
            if not self._is_inbox(reply_to):
                return None
            ErrorReply(correlation_id=correlation_id, code="decode_error", message="")
        except Exception:  # anything unreadable means there is nobody to answer
            return None
        return reply_to, correlation_id

    def _is_inbox(self, topic: str) -> bool:
        try:
            return self.topics.parse(topic).kind == "inbox"
        except TopicError:
            return False

    def _reply(self, topic: str, message: Message) -> bool:
        try:
            self.transport.publish(topic, encode(message), qos=0)
        except FoglineError as exc:
            log.warning("reply on %s failed: %s", topic, exc.message)
            return False
        return True

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError("msgpack extension types are not allowed")
