"""The MQTT network loop: paho driven from a selector, without select().

paho's ``loop_start()`` thread watches its socket with ``select()``, which cannot take
a descriptor numbered 1024 (FD_SETSIZE) or above: paho reads the error as a lost
connection and reconnects forever. Here paho is driven through its external-loop API
(``socket()``, ``loop_read()``, ``loop_write()``, ``loop_misc()``, ``want_write()``)
from a ``selectors.DefaultSelector`` (epoll on Linux: no descriptor limit).

A :class:`NetworkLoop` can serve many clients, but each transport gets its own (one
thread per client, as with paho's loop). One loop shared by a process was tried and
measured: under CPU load (inference threads holding the GIL) one thread gets one
share of the GIL for every client's traffic, so a hot swap under load in the edge
tests took 2.5 s instead of 1.6 s; and a handler of one client waiting for another
client's acknowledgement would deadlock.

Who does what:

- the loop thread is the only one that reads, writes, closes or (un)registers a
  registered socket, so the selector and paho's socket state need no lock;
- other threads queue packets through paho (``publish()``...) and then :meth:`kick`
  the loop, which writes them;
- connection attempts (TCP connect and TLS handshake block) run on a short-lived
  thread per attempt, so a slow or black-holed broker does not stall other clients;
  the loop registers the socket once the attempt is over;
- reconnects follow a capped exponential backoff whose base is drawn at random
  (jitter), so a fleet does not reconnect in lock-step after a broker restart.

The thread starts with its transport and stops, joined, when the transport closes.

A process that runs many simulated devices may share loops between their transports
(:class:`LoopGroup`, :func:`sharing`: transports made in that context take a place on
one of the group's loops, each loop serving up to ``per_loop`` of them, and it stops
with the last of them). Each transport keeps its own connection, socket, session and
packets; only the thread that reads and writes them is shared. It is not the default
for the reasons above (handlers of one client hold up the others' reading).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

__all__ = [
    "BufferedSocket",
    "Connection",
    "LoopGroup",
    "NetworkLoop",
    "current_loop_group",
    "sharing",
]

log = logging.getLogger("fogline.transport")

_MISC_PERIOD_S = 1.0  # keepalive pings and timeouts, as often as paho's own loop checks
_MAX_TLS_DRAIN = 1000  # bound on loop_read calls for bytes buffered inside one SSL object
_READ_SIZE = 64 * 1024  # one read for a packet's header (and what follows it)
_LOWAT_MIN = 16 * 1024  # a rest of a packet worth waiting for in one piece
_LOWAT_MAX = 256 * 1024  # ... at most this much (the kernel grows the buffer to 2x)


class BufferedSocket:
    """A plain TCP socket as paho reads it, with fewer system calls and wake-ups.

    paho reads a packet with one ``recv`` for its first byte, one per byte of its
    length and one or more for its body, then one more that finds nothing: four or
    five system calls for a 4-byte PUBACK, each of which lets the GIL go (and, with
    many clients in one process, waits for it again). Here one read serves a whole
    header, and usually several small packets, from a buffer; the loop drains the
    buffer as it drains an SSL object's (:meth:`pending`: epoll cannot see it).

    While paho waits for the rest of a large body (a 1 MiB artifact chunk arrives in
    15-20 pieces), ``SO_RCVLOWAT`` makes the socket readable only once a good part of
    that rest is there, so the loop wakes a few times per chunk instead of once per
    piece. It never exceeds what the packet still needs (the invariant that keeps a
    last piece from waiting forever), and is back to 1 when the packet is complete.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0
        self._lowat = 1
        self._lowat_ok = sock.family in (socket.AF_INET, socket.AF_INET6)

    def recv(self, size: int) -> bytes:
        available = len(self._data) - self._pos
        if available > 0:  # what an earlier read brought in
            end = self._pos + min(size, available)
            data = self._data[self._pos : end]
            self._pos = end
            if end == len(self._data):
                self._data, self._pos = b"", 0
            self._needs(size - len(data))
            return data
        try:
            # A large body comes straight from the kernel (no copy through the buffer).
            data = self._sock.recv(max(size, _READ_SIZE))
        except BlockingIOError:
            self._wait_for(size)
            raise
        if len(data) > size:
            self._data, self._pos = data, size
            data = data[:size]
        self._needs(size - len(data))
        return data

    def recv_into(self, view: memoryview) -> int:
        """Like ``socket.recv_into``: for a large packet body read straight into the
        packet's own buffer (no bytes object per piece, no copy to append it)."""
        size = len(view)
        available = len(self._data) - self._pos
        if available > 0:
            count = min(size, available)
            with memoryview(self._data) as data:
                view[:count] = data[self._pos : self._pos + count]
            self._pos += count
            if self._pos == len(self._data):
                self._data, self._pos = b"", 0
            self._needs(size - count)
            return count
        try:
            count = self._sock.recv_into(view)
        except BlockingIOError:
            self._wait_for(size)
            raise
        self._needs(size - count)
        return count

    def pending(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._data) - self._pos

    def _needs(self, rest: int) -> None:
        # Never wait for more than the packet still needs: the last piece could be all.
        if self._lowat > 1 and self._lowat > rest:
            self._set_lowat(1)

    def _wait_for(self, size: int) -> None:
        """paho needs ``size`` more bytes and the socket has none: wake us when a good
        part of them is there (for a large rest; small ones are read as they come)."""
        self._set_lowat(min(size, _LOWAT_MAX) if size >= _LOWAT_MIN else 1)

    def _set_lowat(self, value: int) -> None:
        if value == self._lowat or not self._lowat_ok:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
            self._lowat = value
        except OSError:  # not supported here: read as it comes
            self._lowat_ok = False

    def send(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._data, self._pos = b"", 0
        self._sock.close()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeername...: the socket's
        return getattr(self._sock, name)


class Connection:
    """One paho client as the loop sees it: its socket in the selector, its backoff,
    and whether it is leaving. Fields are touched on the loop thread only, except
    where noted."""

    def __init__(
        self, client: paho.Client, *, name: str, reconnect_min_s: float, reconnect_max_s: float
    ) -> None:
        self.client = client
        self.name = name
        self._min_s = reconnect_min_s
        self._max_s = reconnect_max_s
        self._delay: float | None = None
        self.next_attempt: float | None = 0.0  # the first attempt is immediate
        self.worker: threading.Thread | None = None  # the attempt under way
        self.last_worker: threading.Thread | None = None  # joined by the transport's close
        self.registered: Any = None  # the socket in the selector
        self.events = 0
        self.closing = False
        self.flush_disconnect = False  # a DISCONNECT is queued: let it out before closing
        self.deadline = 0.0
        self.removed = threading.Event()  # set by the loop (any thread may wait on it)

    def reset_backoff(self) -> None:
        """After an accepted CONNACK: the next loss waits the (re-drawn) base again."""
        self._delay = None

    def next_delay(self) -> float:
        if self._delay is None:
            self._delay = min(self._min_s * random.uniform(0.5, 1.5), self._max_s)
        else:
            self._delay = min(self._delay * 2, self._max_s)
        return self._delay


class NetworkLoop:
    """A selector loop on one thread, serving many :class:`Connection` s."""

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._commands: list[Callable[[], None]] = []
        self._dirty: set[Connection] = set()
        self._woken = False
        self._conns: set[Connection] = set()
        self._stopping = False
        self._next_misc = 0.0
        # Named like paho's own network thread: tools and tests that look for it find it.
        self._thread = threading.Thread(
            target=self._run, name=f"paho-mqtt-client-{name}", daemon=True
        )

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def add(self, conn: Connection) -> None:
        self._post(lambda: self._conns.add(conn))

    def kick(self, conn: Connection) -> None:
        """``conn`` has queued packets (publish, subscribe...): write them."""
        self._post(dirty=conn)

    def remove(self, conn: Connection, timeout: float) -> None:
        """Drop ``conn``: after its queued DISCONNECT went out if ``flush_disconnect``,
        or ``timeout`` seconds at most. ``conn.removed`` is set once its socket is closed."""
        deadline = time.monotonic() + timeout

        def begin() -> None:
            conn.closing = True
            conn.deadline = deadline
            conn.next_attempt = None
            if conn not in self._conns:
                conn.removed.set()

        self._post(begin)

    def stop(self) -> None:
        def stop() -> None:
            self._stopping = True

        self._post(stop)

    def join(self, timeout: float) -> None:
        if not self.in_loop():
            self._thread.join(timeout)

    def _post(
        self, command: Callable[[], None] | None = None, dirty: Connection | None = None
    ) -> None:
        with self._lock:
            if command is not None:
                self._commands.append(command)
            if dirty is not None:
                self._dirty.add(dirty)
            # On the loop thread the queue is read before the next select anyway.
            if self._woken or self.in_loop():
                return
            self._woken = True
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
            self._wake_w.send(b"\0")

    # -- loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    commands, self._commands = self._commands, []
                    dirty, self._dirty = self._dirty, set()
                    self._woken = False
                for command in commands:
                    command()
                for conn in dirty:
                    if self._writable(conn):
                        self._guard(conn, conn.client.loop_write)
                now = time.monotonic()
                self._remove_finished(now)
                if self._stopping and not self._conns:
                    return
                self._start_attempts(now)
                if now >= self._next_misc:
                    self._next_misc = now + _MISC_PERIOD_S
                    for conn in list(self._conns):
                        if conn.registered is not None:
                            self._guard(conn, conn.client.loop_misc)
                for key, mask in self._selector.select(self._timeout(now)):
                    conn = key.data
                    if conn is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        continue
                    if mask & selectors.EVENT_READ and conn.registered is key.fileobj:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and conn.registered is key.fileobj:
                        self._guard(conn, conn.client.loop_write)
        except Exception:  # a bug here would silently stall every client: say so loudly
            log.exception("the MQTT network loop failed; all its clients are stopped")
        finally:
            self._shutdown()

    def _timeout(self, now: float) -> float:
        with self._lock:
            if self._commands or self._dirty:
                return 0.0
        wake_at = self._next_misc
        for conn in self._conns:
            if conn.closing:
                wake_at = min(wake_at, conn.deadline)
            elif conn.next_attempt is not None and conn.worker is None:
                wake_at = min(wake_at, conn.next_attempt)
        return max(0.0, min(wake_at - now, _MISC_PERIOD_S))

    def _read(self, conn: Connection) -> None:
        sock = conn.registered
        self._guard(conn, conn.client.loop_read)
        # Bytes already read can wait where epoll cannot see them: decrypted inside an
        # SSL object, or in a BufferedSocket. Each loop_read either completes a packet
        # or takes all of a BufferedSocket's bytes, so draining one always ends.
        pending = getattr(sock, "pending", None)
        bound = None if isinstance(sock, BufferedSocket) else _MAX_TLS_DRAIN
        drains = 0
        while pending is not None and conn.registered is sock:
            if pending() <= 0 or (bound is not None and drains >= bound):
                break
            drains += 1
            self._guard(conn, conn.client.loop_read)

    def _guard(self, conn: Connection, step: Callable[[], Any]) -> None:
        """Run one paho step for ``conn``, write what it queued (replies, PUBACKs) at
        once, then follow what happened to its socket."""
        try:
            step()
            # Writing now, rather than after one more select() for writability, saves
            # system calls: each lets the GIL go, which costs dearly under CPU load.
            if step != conn.client.loop_write and self._writable(conn):
                conn.client.loop_write()
        except Exception:  # paho or one of our callbacks: this client only
            log.exception("MQTT client %s failed in its network step", conn.name)
            self._close_socket(conn)
        self._after(conn)

    @staticmethod
    def _writable(conn: Connection) -> bool:
        return (
            conn.registered is not None
            and conn.client.socket() is conn.registered
            and bool(conn.client.want_write())
        )

    def _after(self, conn: Connection) -> None:
        if conn.worker is not None:  # an attempt owns the client until _attempt_done
            return
        sock = conn.client.socket()
        if sock is None or sock is not conn.registered:
            self._unregister(conn)
            if sock is not None:  # not ours (cannot happen with paho 2.x): close it
                self._close_socket(conn)
            if not conn.closing and conn.next_attempt is None and conn.worker is None:
                conn.next_attempt = time.monotonic() + conn.next_delay()
            return
        events = selectors.EVENT_READ
        if conn.client.want_write():
            events |= selectors.EVENT_WRITE
        if events != conn.events:
            self._selector.modify(sock, events, conn)
            conn.events = events

    def socket_closing(self, conn: Connection, sock: Any) -> None:
        """paho's on_socket_close: unregister before the descriptor is closed (and
        reused). paho closes registered sockets on the loop thread only."""
        if conn.registered is sock and self.in_loop():
            self._unregister(conn)

    def _unregister(self, conn: Connection) -> None:
        if conn.registered is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.registered)
            conn.registered = None
            conn.events = 0

    def _close_socket(self, conn: Connection) -> None:
        # paho has no public "drop the socket"; _sock_close also runs on_socket_close.
        with contextlib.suppress(Exception):
            conn.client._sock_close()
        self._unregister(conn)

    # -- connection attempts ---------------------------------------------------------------
    def _start_attempts(self, now: float) -> None:
        for conn in self._conns:
            if conn.closing or conn.worker is not None or conn.registered is not None:
                continue
            if conn.next_attempt is None or conn.next_attempt > now:
                continue
            conn.next_attempt = None
            worker = threading.Thread(
                target=self._attempt,
                args=(conn,),
                name=f"fogline-mqtt-connect-{conn.name}",
                daemon=True,
            )
            conn.worker = conn.last_worker = worker
            worker.start()

    def _attempt(self, conn: Connection) -> None:
        # Attempt thread: the loop leaves conn alone until _attempt_done runs.
        ok = False
        try:
            ok = conn.client.reconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS handshake failed
            log.debug("MQTT client %s: connection attempt failed: %s", conn.name, exc)
        except Exception:
            log.exception("MQTT client %s: connection attempt failed", conn.name)
        self._post(lambda: self._attempt_done(conn, ok))

    def _attempt_done(self, conn: Connection, ok: bool) -> None:
        conn.worker = None
        sock = conn.client.socket()
        if conn.closing or not ok or sock is None:
            if sock is not None:
                self._close_socket(conn)
            if not conn.closing:
                conn.next_attempt = time.monotonic() + conn.next_delay()
            return
        with contextlib.suppress(KeyError):  # a stale entry for a reused descriptor
            self._selector.unregister(sock.fileno())
        self._selector.register(sock, selectors.EVENT_READ, conn)
        conn.registered, conn.events = sock, selectors.EVENT_READ
        self._guard(conn, conn.client.loop_write)  # the CONNECT packet

    def _remove_finished(self, now: float) -> None:
        for conn in list(self._conns):
            if not conn.closing or conn.worker is not None:
                continue
            if conn.registered is not None and conn.flush_disconnect and now < conn.deadline:
                continue  # the DISCONNECT is on its way; paho closes the socket after it
            self._close_socket(conn)
            self._conns.discard(conn)
            conn.removed.set()

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
        for conn in list(self._conns):
            self._close_socket(conn)
            conn.removed.set()
        self._conns.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class LoopGroup:
    """Network loops shared by the transports made under :func:`sharing`: each takes a
    place on the first loop with room (``per_loop`` transports at most), a loop starts
    with its first transport and stops, joined, with its last."""

    def __init__(self, per_loop: int, name: str = "shared") -> None:
        if per_loop < 1:
            raise ValueError("per_loop must be at least 1")
        self.per_loop = per_loop
        self._name = name
        self._lock = threading.Lock()
        self._users: dict[NetworkLoop, int] = {}  # running loops, in start order
        self._made = 0

    def acquire(self) -> NetworkLoop:
        with self._lock:
            for loop, users in self._users.items():
                if users < self.per_loop:
                    self._users[loop] = users + 1
                    return loop
            self._made += 1
            loop = NetworkLoop(f"{self._name}-{self._made}")
            loop.start()
            self._users[loop] = 1
            return loop

    def release(self, loop: NetworkLoop, timeout: float) -> None:
        with self._lock:
            users = self._users.get(loop, 0) - 1
            if users > 0:
                self._users[loop] = users
                return
            self._users.pop(loop, None)
        loop.stop()
        loop.join(timeout)

    @property
    def loops(self) -> int:
        """Loops running now."""
        with self._lock:
            return len(self._users)


_GROUP: contextvars.ContextVar[LoopGroup | None] = contextvars.ContextVar(
    "fogline_mqtt_loop_group", default=None
)


def current_loop_group() -> LoopGroup | None:
    """The group transports made now share loops in (None: each gets its own)."""
    return _GROUP.get()


@contextlib.contextmanager
def sharing(group: LoopGroup | None) -> Iterator[None]:
    """Transports made in this context (this thread) use ``group``'s loops."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)
