"""Bridge-side batching: many requests for one model, one Serve call. No Ray here.

A Ray call costs milliseconds of CPU on each side (serialisation, the Serve router, the
replica's request handling); on a small machine that overhead, paid per request, is what
saturates first. :class:`ModelBatcher` pays it per *batch* instead, adaptively, without a
timer: while fewer than ``max_calls`` calls are in flight a request is sent at once (no
added latency when idle); while they are all busy, requests queue, and the next free slot
takes up to ``max_batch`` of them in one call. So the batch size follows the load.

A request whose waiter gave up (its deadline passed) is skipped when the batch is formed,
so stale work never reaches Serve.
"""

from __future__ import annotations

import asyncio
import logging
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
        key: object = None,
    ) -> None:
        if max_batch < 1 or max_calls < 1:
            raise ValueError("max_batch and max_calls must be at least 1")
        self.call = call
        self.key = key  # what this batcher serves (the bridge's handle), to spot swaps
        self.max_batch = max_batch
        self.max_calls = max_calls
        self.calls = 0  # Serve calls made
        self.batched = 0  # requests those calls carried
        self.skipped = 0  # abandoned before they were sent
        self._queue: deque[_Item] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop only keeps weak references

    @property
    def queued(self) -> int:
        return len(self._queue)

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
        while self._running < self.max_calls and self._queue:
            batch: list[_Item] = []
            now = loop.time()
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if item.future.done() or item.deadline <= now:
                    self.skipped += 1
                    if not item.future.done():
                        item.future.set_exception(TimeoutError())
                    continue
                batch.append(item)
            if not batch:
                return
            self._running += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Item]) -> None:
        self.calls += 1
        self.batched += len(batch)
        # Nobody waits longer than the latest deadline in the batch: bound the call by it
        # so a hung replica cannot hold a slot for ever.
        timeout = max(item.deadline for item in batch) - asyncio.get_running_loop().time()
        try:
            call = _resolve(self.call([i.inputs for i in batch]))
            results = await asyncio.wait_for(call, max(timeout, 0.001))
            if not isinstance(results, list) or len(results) != len(batch):
                raise TypeError(f"Serve returned {type(results).__name__} for {len(batch)}")
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


async def _resolve(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
