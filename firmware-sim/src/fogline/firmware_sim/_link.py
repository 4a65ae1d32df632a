"""The simulated network between each device and the broker.

Every device's agent connects to its own loopback port; a TCP relay there forwards the
bytes to the real broker, after the delays the device's link would add: half the round
trip each way, jitter, a retransmission timeout for segments "lost" (MQTT runs over
TCP, so loss shows up as delay, never as missing messages) and the serialisation time
of a limited bandwidth. Order is preserved per direction, as on TCP.

Because the relay owns the sockets it can also fail them the way a real link fails: a
``down`` link aborts its connections without an MQTT DISCONNECT, so the broker publishes
the agent's last will, and refuses new ones until the link comes ``up`` again.

All relays run on one asyncio event loop in one thread, whatever the fleet size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fogline.protocol import FoglineError

from ._profiles import LinkProfile

__all__ = ["LinkEmulator", "LinkState"]

log = logging.getLogger("fogline.firmware_sim.link")

_READ_SIZE = 64 * 1024
_SEGMENT = 1460
_MIN_RTO_S = 0.2


@dataclass
class LinkState:
    """The current condition of one device's link (changed by faults)."""

    profile: LinkProfile
    up: bool = True
    extra_latency_ms: float = 0.0
    bandwidth_kbps: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    aborted: int = 0

    @property
    def effective_bandwidth_kbps(self) -> float | None:
        if self.bandwidth_kbps is not None:
            return self.bandwidth_kbps
        return self.profile.bandwidth_kbps


@dataclass
class _Direction:
    """Delay bookkeeping for one direction of one connection."""

    busy_until: float = 0.0
    last_due: float = 0.0


@dataclass
class _Device:
    state: LinkState
    server: asyncio.Server | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


class LinkEmulator:
    """Per-device TCP relays to one upstream broker, all on one event loop thread."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._rng = random.Random(seed)
        self._devices: dict[str, _Device] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            # Relay tasks still pending when the loop stops would be destroyed mid-run
            # (asyncio logs "Task was destroyed but it is pending"): cancel and unwind them.
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fogline-sim-link", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._close_all(), timeout=10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- devices ----------------------------------------------------------------------------
    def add_device(self, device_id: str, profile: LinkProfile) -> int:
        """Open the device's relay; returns the loopback port its agent connects to."""
        if device_id in self._devices:
            return self._devices[device_id].port
        device = _Device(LinkState(profile))
        self._devices[device_id] = device
        self._call(self._open(device_id, device))
        return device.port

    def state(self, device_id: str) -> LinkState:
        return self._device(device_id).state

    def set_down(self, device_id: str) -> None:
        """Cut the link: abort open connections (no DISCONNECT reaches the broker, so it
        publishes the last will) and refuse new ones until :meth:`set_up`."""
        device = self._device(device_id)
        device.state.up = False
        self._call(self._abort(device))

    def set_up(self, device_id: str) -> None:
        self._device(device_id).state.up = True

    def set_slow(
        self, device_id: str, *, extra_latency_ms: float = 0.0, bandwidth_kbps: float | None = None
    ) -> None:
        state = self._device(device_id).state
        state.extra_latency_ms = extra_latency_ms
        state.bandwidth_kbps = bandwidth_kbps

    def restore(self, device_id: str) -> None:
        self.set_slow(device_id)

    # -- internals (event loop thread) ---------------------------------------------------------
    def _device(self, device_id: str) -> _Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise FoglineError(f"no simulated link for device {device_id!r}") from None

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float = 30.0) -> None:
        if self._loop is None:
            raise FoglineError("the link emulator is not running")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self, device_id: str, device: _Device) -> None:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Cancelled at stop. Ending normally matters: on Python 3.11 asyncio's
            # client-connected callback calls task.exception(), which raises for a
            # cancelled task and logs a traceback.
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay(device, reader, writer)

        device.server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        device.port = int(device.server.sockets[0].getsockname()[1])
        log.debug("link for %s on port %d", device_id, device.port)

    async def _abort(self, device: _Device) -> None:
        for writer in list(device.writers):
            writer.transport.abort()
        device.state.aborted += len(device.writers)
        device.writers.clear()

    async def _close_all(self) -> None:
        for device in self._devices.values():
            await self._abort(device)
            if device.server is not None:
                device.server.close()
        for device in self._devices.values():
            if device.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(device.server.wait_closed(), 2.0)

    async def _relay(
        self, device: _Device, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
    ) -> None:
        if not device.state.up:
            c_writer.transport.abort()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            c_writer.transport.abort()
            return
        device.writers.update((c_writer, u_writer))
        try:
            await asyncio.gather(
                self._pump(device, c_reader, u_writer, upstream=True),
                self._pump(device, u_reader, c_writer, upstream=False),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (c_writer, u_writer):
                device.writers.discard(writer)
                writer.transport.abort()

    async def _pump(
        self,
        device: _Device,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        direction = _Direction()
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                if upstream:
                    device.state.bytes_up += len(data)
                else:
                    device.state.bytes_down += len(data)
                queue.put_nowait((self._due(device.state, direction, len(data)), data))
        finally:
            queue.put_nowait(None)
            await sender

    def _due(self, state: LinkState, direction: _Direction, size: int) -> float:
        """When ``size`` bytes read now arrive at the other end."""
        now = time.monotonic()
        link = state.profile
        one_way = link.rtt_ms / 2000.0 + state.extra_latency_ms / 1000.0
        if link.jitter_ms:
            one_way += abs(self._rng.gauss(0.0, link.jitter_ms / 1000.0))
        if link.loss:
            segments = math.ceil(size / _SEGMENT)
            if self._rng.random() < 1.0 - (1.0 - link.loss) ** segments:
                one_way += max(_MIN_RTO_S, 2 * link.rtt_ms / 1000.0)
        bandwidth = state.effective_bandwidth_kbps
        start = max(now, direction.busy_until)
        direction.busy_until = start + (size * 8 / (bandwidth * 1000.0) if bandwidth else 0.0)
        due = max(direction.busy_until + one_way, direction.last_due)
        direction.last_due = due
        return due

    @staticmethod
    async def _send(
        queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if writer.transport.is_closing():
                return
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
