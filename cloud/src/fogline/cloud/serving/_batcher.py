"""Bridge-side batching: many requests for one model, one Serve call. No Ray here.

A Ray call costs milliseconds of CPU on each side (serialisation, the Serve router, the
replica's request handling); on a small machine that overhead, paid per request, is what
saturates first. :class:`ModelBatcher` pays it per *batch* instead, adaptively, without a
timer: while fewer than ``max_calls`` calls are in flight a request is sent at once (no
added latency when idle); while they are all busy, requests queue, and the next free slot
takes up to ``max_batch`` of them in one call. So the batch size follows the load.

Batches are also bounded by time: a call costs about ``overhead + n * per_item`` (running
estimates: the replica reports its run time as ``service_ms``, the rest of the call is
overhead), and a batch stops growing when its oldest request could no longer be
answered in time. On a CPU, a batch of n costs about n single runs, so an oversized
batch only makes everyone in it late.

A request whose waiter gave up, or whose deadline would pass before even a call of its
own could come back, is not sent: its waiter gets a
``TimeoutError`` at once, so the client can fall back without waiting and the replica
spends no CPU on an answer nobody will read. Under overload this is what keeps the
requests that *can* meet their deadline meeting it.

"A call of its own" is the robust figure :meth:`ModelBatcher.expected_s` gives with a
free slot (the median of the recent calls; with none for ``fresh_s``, the fastest), not
the running averages that size batches: one stalled call (a pause in Ray) raised those
past a budgeted request's deadline, every later request was refused without a call, and
with no call nothing brought them down (measured: a cloud that refused every budgeted
request of a 4 s run after an overload).

A call in flight is not cancelled when its requests' deadlines pass: once a replica
runs a batch, cancelling saves no CPU and costs another RPC. Only ``hang_timeout_s``
bounds it (a replica that never answers).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BatchCall", "ModelBatcher"]

log = logging.getLogger("fogline.cloud.bridge")

Inputs = dict[str, np.ndarray]
BatchCall = Callable[[list[Inputs]], Awaitable[Any]]
"""Sends a batch to Serve; resolves to one result per input, in order."""


@dataclass
class _Item:
    inputs: Inputs
    future: asyncio.Future[Any]
    deadline: float  # loop time after which nobody waits for it


class ModelBatcher:
    """Batches the requests of one model. Use on one asyncio loop only."""

    def __init__(
        self,
        call: BatchCall,
        *,
        max_batch: int = 32,
        max_calls: int = 2,
        hang_timeout_s: float = 10.0,
        alpha: float = 0.2,
        fresh_s: float = 1.0,
        key: object = None,
    ) -> None:
        if max_batch < 1 or max_calls < 1:
            raise ValueError("max_batch and max_calls must be at least 1")
        self.call = call
        self.key = key  # what this batcher serves (the bridge's handle), to spot swaps
        self.max_batch = max_batch
        self.max_calls = max_calls
        self.hang_timeout_s = hang_timeout_s
        self.overhead_s = 0.0  # running estimates: a call's fixed cost (Ray, transfer) ...
        self.item_s = 0.0  # ... and its cost per request (the replica's run time / n)
        self._alpha = alpha
        self.calls = 0  # Serve calls made
        self.batched = 0  # requests those calls carried
        self.skipped = 0  # abandoned before they were sent
        self.fresh_s = fresh_s
        self._recent_calls: deque[float] = deque(maxlen=32)  # one request's call time
        self._fastest_call = float("inf")  # the fastest of them all, since the start
        self._last_finish = float("-inf")  # time.monotonic() of the last call's end
        self._queue: deque[_Item] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop only keeps weak references

    @property
    def queued(self) -> int:
        return len(self._queue)

    def expected_s(self) -> float:
        """How long a request submitted now would take: one call if a slot is free,
        else about one call's wait for a slot, then a batch behind those queued. Only
        reads counters, so other threads may ask (a slightly stale answer is fine).

        A free slot answers with the median of the last calls (one request's share),
        so a single slow call (a pause in Ray, a busy core) does not scare clients
        away. With no call for ``fresh_s`` even that is old news: it may come from a
        burst that made clients stop sending, and would keep them away for good
        (nothing updates it without calls). So an idle batcher answers with the
        fastest call it has made: the fastest *recent* one was not enough, since after
        a long overload every recent call was slow, devices kept refusing, and no
        call came to bring the figure down (measured: a cloud left unused for whole
        runs). The next real calls correct it if the cloud is still slow."""
        if self._running < self.max_calls:
            return self._one_call_s()
        call = self.overhead_s + self.item_s
        return call + self.overhead_s + (len(self._queue) + 1) * self.item_s

    def _one_call_s(self) -> float:
        """A call of one request's own, now: the median of the recent calls, or the
        fastest call once none finished for ``fresh_s`` (see :meth:`expected_s`)."""
        recent = list(self._recent_calls)
        if not recent:
            return self.overhead_s + self.item_s
        if time.monotonic() - self._last_finish > self.fresh_s:
            return min(self._fastest_call, min(recent))
        return statistics.median(recent)

    def submit(self, inputs: Inputs, timeout_s: float) -> asyncio.Future[Any]:
        """Queue one request; the future resolves to its result or raises what the Serve
        call raised. Cancel the future to abandon the request."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Item(inputs, future, loop.time() + timeout_s))
        self._pump()
        return future

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        one_call = self._one_call_s() if self._queue else 0.0
        while self._running < self.max_calls and self._queue:
            batch: list[_Item] = []
            now = loop.time()
            oldest = float("inf")
            while self._queue and len(batch) < self.max_batch:
                item = self._queue[0]
                if item.future.done() or item.deadline - now < one_call:
                    self._queue.popleft()
                    self.skipped += 1
                    if not item.future.done():
                        item.future.set_exception(TimeoutError())
                    continue
                finish = now + self.overhead_s + (len(batch) + 1) * self.item_s
                if batch and finish > min(oldest, item.deadline):
                    break  # one more would make this batch late; the rest waits
                batch.append(self._queue.popleft())
                oldest = min(oldest, item.deadline)
            if not batch:
                return
            self._running += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Item]) -> None:
        self.calls += 1
        self.batched += len(batch)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            call = _resolve(self.call([i.inputs for i in batch]))
            results = await asyncio.wait_for(call, self.hang_timeout_s)
            if not isinstance(results, list) or len(results) != len(batch):
                raise TypeError(f"Serve returned {type(results).__name__} for {len(batch)}")
            self._learn(loop.time() - start, len(batch), results[0])
        except Exception as exc:  # every waiter gets the call's failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._running -= 1
            self._pump()

    def _learn(self, took: float, size: int, first: Any) -> None:
        run_ms = first.get("service_ms") if isinstance(first, dict) else None
        run = float(run_ms) / 1000.0 if isinstance(run_ms, int | float) else 0.0
        run = min(max(run, 0.0), took)
        a = self._alpha if self.calls > 1 else 1.0  # the first call sets the estimates
        self.item_s += a * (run / size - self.item_s)
        self.overhead_s += a * ((took - run) - self.overhead_s)
        per_request = took - run + run / size
        self._recent_calls.append(per_request)
        self._fastest_call = min(self._fastest_call, per_request)
        self._last_finish = time.monotonic()


async def _resolve(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
