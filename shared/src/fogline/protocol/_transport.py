"""One small MQTT client for both tiers, over paho-mqtt 2.x.

paho does the protocol; the network loop is ours (``_mqtt_loop``: a selector thread,
so no FD_SETSIZE limit, and a capped exponential reconnect backoff with jitter). This
wrapper adds what Fogline needs on top:

- subscriptions that survive reconnects (re-sent on every CONNACK);
- handlers that may raise without killing the network loop (logged and counted);
- paho's return and reason codes translated to Fogline errors, in :func:`_check_rc`
  and :func:`_connack_error` only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.reasoncodes import ReasonCode

from ._errors import (
    BrokerUnavailableError,
    ConfigError,
    FoglineError,
    NotConnectedError,
    PublishError,
    SubscribeError,
    TransportError,
)
from ._mqtt_loop import BufferedSocket, Connection, NetworkLoop, current_loop_group
from ._mqtt_settings import MqttSettings, Will, check_client_id, tls_context

__all__ = ["Handler", "MqttMessage", "MqttSettings", "MqttTransport", "Will"]

log = logging.getLogger("fogline.transport")


@dataclass(frozen=True)
class MqttMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool


Handler = Callable[[MqttMessage], None]


@dataclass
class _PendingSubscribe:
    """A SUBSCRIBE in flight, completed by its SUBACK on the network thread."""

    filters: list[str]
    done: threading.Event
    refused: list[str]


ConnectionListener = Callable[[bool], None]


def _check_rc(rc: MQTTErrorCode | int, action: str) -> None:
    """Translate a paho return code into a Fogline error (one of two translation points)."""
    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
        return
    text = paho.error_string(rc)
    if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
        raise NotConnectedError(f"{action}: not connected to the broker")
    if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
        raise PublishError(f"{action}: the outgoing queue is full")
    if rc == MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE:
        raise PublishError(f"{action}: the payload is too large")
    if rc in (MQTTErrorCode.MQTT_ERR_CONN_REFUSED, MQTTErrorCode.MQTT_ERR_CONN_LOST):
        raise BrokerUnavailableError(f"{action}: {text}")
    raise TransportError(f"{action}: {text}")


def _connack_error(reason: ReasonCode, url: str) -> FoglineError:
    """Translate a refused CONNACK into a Fogline error (the other translation point)."""
    name = reason.getName()
    if name in ("Bad user name or password", "Not authorized"):
        return BrokerUnavailableError(f"broker {url} refused the connection: {name}")
    return BrokerUnavailableError(f"broker {url} refused the connection: {name} ({reason.value})")


def _check_filter(topic_filter: str) -> None:
    """Raise SubscribeError unless ``topic_filter`` is a valid MQTT topic filter."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise SubscribeError("a topic filter must be a non-empty string")
    if "\x00" in topic_filter or len(topic_filter.encode()) > 65535:
        raise SubscribeError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        misplaced_hash = "#" in level and (level != "#" or i != len(levels) - 1)
        if misplaced_hash or ("+" in level and level != "+"):
            raise SubscribeError(
                f"invalid topic filter {topic_filter!r}: '+' and '#' must fill a whole level, "
                "and '#' must be the last"
            )


def _disable_nagle(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _no_op(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """paho writes queued packets itself, from the calling thread, unless a
    register-write callback is set; the loop decides from ``want_write()`` instead."""


def _strip_share(topic_filter: str) -> str:
    """``$share/group/a/b`` delivers messages on ``a/b``; match handlers on that."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic_filter


_ONE_COPY_MIN = 64 * 1024  # PUBLISH bodies from this size on are taken apart in place
_BODY_INTO_MIN = 64 * 1024  # packet bodies from this size on are read into one buffer
_MAX_READS = 100  # reads per call for one packet, as paho (a huge one yields meanwhile)


class _Client(paho.Client):
    """paho's client reading a plain TCP connection through a :class:`BufferedSocket`
    (fewer system calls and wake-ups per packet), and taking large incoming PUBLISH
    packets apart with one copy of the payload instead of two. TLS, websocket and
    Unix-socket connections are left as paho makes them. paho has no public hook for
    either; if its private ``_create_socket`` goes away, that changes nothing, and
    :meth:`_handle_publish` leaves every case it does not know to paho."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if type(sock) is socket.socket and sock.type == socket.SOCK_STREAM:
            return BufferedSocket(sock)
        return sock

    def _packet_read(self) -> MQTTErrorCode:
        # paho reads a body piece by piece (a fresh bytes object each, up to the whole
        # rest's size) and appends each to the packet (a growing bytearray): for a 1 MiB
        # chunk a dozen allocations and copies. Here a large body is received straight
        # into a bytearray of its final size. Same states, results and errors as paho's.
        sock = self._sock
        if not isinstance(sock, BufferedSocket):
            return super()._packet_read()
        state = self._in_packet
        try:
            if state["command"] == 0:
                command = sock.recv(1)
                if not command:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                state["command"] = command[0]
            if state["have_remaining"] == 0:
                while True:
                    byte = sock.recv(1)
                    if not byte:
                        return MQTTErrorCode.MQTT_ERR_CONN_LOST
                    state["remaining_count"].append(byte[0])
                    if len(state["remaining_count"]) > 4:  # at most 4 bytes of length
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
                    state["remaining_length"] += (byte[0] & 127) * state["remaining_mult"]
                    state["remaining_mult"] *= 128
                    if not byte[0] & 128:
                        break
                state["have_remaining"] = 1
                state["to_process"] = state["remaining_length"]
                if state["remaining_length"] >= _BODY_INTO_MIN:
                    state["packet"] = bytearray(state["remaining_length"])
            packet = state["packet"]
            into = state["remaining_length"] >= _BODY_INTO_MIN
            reads = _MAX_READS
            while state["to_process"] > 0:
                if into:
                    with memoryview(packet) as view:
                        count = sock.recv_into(view[len(packet) - state["to_process"] :])
                else:
                    data = sock.recv(state["to_process"])
                    count = len(data)
                    packet += data
                if count == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                state["to_process"] -= count
                with self._msgtime_mutex:
                    self._last_bytes_received = paho.time_func()
                reads -= 1
                if reads == 0:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        state["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        # paho slices the packet with struct.unpack twice (topic, then message id), each
        # a copy of the whole payload: for a 1 MiB artifact chunk two fresh megabytes,
        # per device. Here the payload is copied out once. MQTT 3.1.1, QoS 0 and 1 only;
        # anything else, or anything malformed, goes to paho as before.
        state = getattr(self, "_in_packet", None)
        packet = state.get("packet") if isinstance(state, dict) else None
        if not isinstance(packet, bytearray) or len(packet) < _ONE_COPY_MIN:
            return super()._handle_publish()
        header = int(state["command"])  # type: ignore[index]
        qos = (header & 0x06) >> 1
        if qos > 1 or getattr(self, "_protocol", None) != MQTTProtocolVersion.MQTTv311:
            return super()._handle_publish()
        topic_end = 2 + int.from_bytes(packet[:2], "big")
        start = topic_end + 2 * qos
        if topic_end == 2 or start > len(packet):
            return super()._handle_publish()
        message = paho.MQTTMessage(
            mid=int.from_bytes(packet[topic_end:start], "big"), topic=bytes(packet[2:topic_end])
        )
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        with memoryview(packet) as view:
            message.payload = view[start:].tobytes()
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class MqttTransport:
    """A connected MQTT client with handlers per topic filter.

    Handlers run on the network thread: keep them short, hand long work to a worker,
    and never wait there for this transport's acknowledgements (``wait=True`` raises
    :class:`TransportError` on that thread).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        will: Will | None = None,
        clean_session: bool = True,
    ) -> None:
        self.settings = settings
        self.client_id = check_client_id(client_id or f"fogline-{uuid.uuid4().hex[:12]}")
        self.handler_errors = 0
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()  # set by each CONNACK, accepted or refused
        self._pending_subs: dict[int, _PendingSubscribe] = {}
        # The latest refusing PUBACK (MQTT 5 reason code) per message id. Its own lock:
        # paho calls on_publish holding its message mutex, which publish() also takes.
        self._pub_lock = threading.Lock()
        self._pub_refusals: dict[int, ReasonCode] = {}
        self._refusal: FoglineError | None = None
        self._listeners: list[ConnectionListener] = []
        self._started = False
        self._closed = False
        self._loop: NetworkLoop | None = None
        self._conn: Connection | None = None
        # Made under _mqtt_loop.sharing(): the network thread is one of a group's.
        self._group = current_loop_group()

        v5 = settings.protocol == "5"
        self._client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else clean_session,
        )
        self._clean_start = clean_session
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(0)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        if settings.uses_tls:
            self._client.tls_set_context(tls_context(settings))
        if will is not None:
            # paho accepts wildcards here; the broker would then drop the connection.
            if not will.topic or any(c in will.topic for c in "+#\x00"):
                raise ConfigError(f"mqtt last will: topic {will.topic!r} must be concrete")
            try:
                self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
            except ValueError as exc:
                raise ConfigError(f"mqtt last will: {exc}") from None
        # Nagle's algorithm plus delayed ACKs adds ~40 ms to every QoS 1 exchange;
        # request/reply traffic (inference, chunks) cannot afford it.
        self._client.on_socket_open = _disable_nagle
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = _no_op
        self._client.on_socket_unregister_write = _no_op
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    # -- connection ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True)`` on every connect and ``listener(False)`` on every loss."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Start connecting in the background; retries forever until :meth:`close`."""
        if self._started:
            return
        self._started = True
        kwargs: dict[str, Any] = {}
        if self.settings.protocol == "5":
            kwargs["clean_start"] = self._clean_start
        try:
            self._client.connect_async(
                self.settings.host, self.settings.port, self.settings.keepalive_s, **kwargs
            )
        except ValueError as exc:
            raise ConfigError(f"mqtt settings: {exc}") from None
        if self._group is not None:
            self._loop = self._group.acquire()
        else:
            self._loop = NetworkLoop(self.client_id)
            self._loop.start()
        self._conn = Connection(
            self._client,
            name=self.client_id,
            reconnect_min_s=self.settings.reconnect_min_s,
            reconnect_max_s=self.settings.reconnect_max_s,
        )
        self._loop.add(self._conn)

    def connect(self, timeout: float = 10.0) -> None:
        """Start and wait until connected. Raises :class:`BrokerUnavailableError` (and
        stops trying) if the broker refuses us or does not answer within ``timeout``."""
        self.start()
        # Returns early on a refusal: a bad password will not get better by waiting.
        self._connack.wait(timeout)
        if not self._connected.is_set():
            refusal = self._refusal
            self.close()
            if refusal is not None:
                raise refusal
            raise BrokerUnavailableError(
                f"no connection to broker {self.settings.url} within {timeout:.1f}s"
            )

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the last will is not sent) and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        loop, conn = self._loop, self._conn
        if loop is not None and conn is not None:
            if self._connected.is_set():
                conn.flush_disconnect = self._client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS
                loop.kick(conn)
            loop.remove(conn, timeout)
            if not loop.in_loop():  # from a handler: the loop finishes after it returns
                conn.removed.wait(timeout + 1.0)
                worker = conn.last_worker
                if worker is not None:
                    worker.join(timeout)
            if self._group is not None:
                self._group.release(loop, timeout)
            else:
                loop.stop()
                loop.join(timeout)
        self._connected.clear()

    def __enter__(self) -> MqttTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pub/sub ------------------------------------------------------------------------
    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        qos: int = 1,
        *,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Call ``handler`` for every message matching ``topic_filter``, now and after
        every reconnect.

        With ``wait``, block until the broker acknowledges the subscription; a refusal
        (e.g. by the broker's ACL) raises :class:`SubscribeError` and removes it again.
        Without ``wait`` a refusal is only logged.
        """
        _check_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise SubscribeError(f"subscribe {topic_filter}: qos must be 0, 1 or 2")
        if self._closed:
            raise NotConnectedError(f"subscribe {topic_filter}: the transport is closed")
        if wait and not self.connected:
            raise NotConnectedError(f"subscribe {topic_filter}: not connected to the broker")
        if wait:
            self._refuse_wait_on_loop(f"subscribe {topic_filter}")
        # The callback goes first, so that retained messages find it.
        self._client.message_callback_add(_strip_share(topic_filter), self._wrap(handler))
        pending = _PendingSubscribe([topic_filter], threading.Event(), [])
        # One lock with _on_connect, which snapshots the subscriptions and then marks us
        # connected: either that snapshot has this filter, or we see "connected" here and
        # send it ourselves. The lock also keeps the SUBACK from overtaking the mid.
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
            connected = self._connected.is_set()
            if connected:
                rc, mid = self._client.subscribe(topic_filter, qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subs[mid] = pending
                    self._kick()
            elif wait:  # the connection dropped since the check above: undo
                del self._subscriptions[topic_filter]
        if not connected:
            if wait:
                self._client.message_callback_remove(_strip_share(topic_filter))
                raise NotConnectedError(f"subscribe {topic_filter}: not connected to the broker")
            return  # sent on the next CONNACK
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and not wait:
            return  # re-sent on reconnect anyway
        _check_rc(rc, f"subscribe {topic_filter}")
        if not wait:
            return
        if not pending.done.wait(timeout):
            raise SubscribeError(f"subscribe {topic_filter}: no SUBACK within {timeout:.1f}s")
        if pending.refused:
            self.unsubscribe(topic_filter)
            raise SubscribeError(f"the broker refused the subscription {topic_filter!r}")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        self._client.message_callback_remove(_strip_share(topic_filter))
        if self.connected:
            self._client.unsubscribe(topic_filter)
            self._kick()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Publish. With ``wait`` (QoS 1 or 2), block until the broker acknowledges it,
        raising :class:`PublishError` on timeout, or if the broker refused it (an MQTT 5
        PUBACK with a failure reason, e.g. "Not authorized" from an ACL; MQTT 3.1.1 has
        no way to say so)."""
        if self._closed:
            raise NotConnectedError(f"publish {topic}: the transport is closed")
        if wait and not self.connected:
            raise NotConnectedError(f"publish {topic}: not connected to the broker")
        if wait:
            self._refuse_wait_on_loop(f"publish {topic}")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise PublishError(f"publish {topic}: {exc}") from None
        self._kick()
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN or wait:
            _check_rc(info.rc, f"publish {topic}")
        if wait:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise PublishError(f"publish {topic}: {exc}") from None
            if not info.is_published():
                raise PublishError(f"publish {topic}: no acknowledgement within {timeout:.1f}s")
            with self._pub_lock:
                refusal = self._pub_refusals.pop(info.mid, None)
            if refusal is not None:
                raise PublishError(f"publish {topic}: the broker refused it: {refusal.getName()}")

    def input_backlog(self) -> int:
        """Bytes the broker has sent that the network thread has not read yet (in the
        socket and in its read buffer); 0 when not connected or not known. Lets a
        batching service tell "no request came" from "requests wait unread"."""
        sock = self._client.socket()
        if sock is None:
            return 0
        try:
            import fcntl
            import termios

            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            waiting = int(struct.unpack("i", raw)[0])
        except (ImportError, OSError, ValueError):  # not POSIX, or the socket just closed
            return 0
        buffered = sock.pending() if isinstance(sock, BufferedSocket) else 0
        return waiting + buffered

    def _kick(self) -> None:
        """paho queued a packet: have the network loop write it."""
        loop, conn = self._loop, self._conn
        if loop is not None and conn is not None:
            loop.kick(conn)

    def _refuse_wait_on_loop(self, action: str) -> None:
        # The acknowledgement would be read by this very thread: it could never come.
        loop = self._loop
        if loop is not None and loop.in_loop():
            raise TransportError(
                f"{action}: cannot wait for the broker on the network thread "
                "(from a handler); hand the work to a worker thread"
            )

    # -- paho callbacks (network thread) ------------------------------------------------
    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        loop, conn = self._loop, self._conn
        if loop is not None and conn is not None:
            loop.socket_closing(conn, sock)

    def _wrap(self, handler: Handler) -> Callable[[paho.Client, Any, paho.MQTTMessage], None]:
        def on_message(_client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
            try:
                handler(MqttMessage(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            except Exception:
                self.handler_errors += 1
                log.exception("handler for %s raised; message dropped", msg.topic)

        return on_message

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refusal = _connack_error(reason, self.settings.url)
            log.warning("%s", self._refusal.message)
            self._connack.set()
            return
        self._refusal = None
        if self._conn is not None:
            self._conn.reset_backoff()
        with self._lock:  # see subscribe(): snapshot and "connected" change together
            subs = list(self._subscriptions.items())
            if subs:
                rc, mid = client.subscribe([(topic, qos) for topic, (qos, _h) in subs])
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    filters = [topic for topic, _ in subs]
                    self._pending_subs[mid] = _PendingSubscribe(filters, threading.Event(), [])
            self._connected.set()
        self._connack.set()
        log.info("connected to %s as %s", self.settings.url, self.client_id)
        self._notify(True)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            # Not after a refused CONNACK: connect() may not have seen that event yet.
            self._connack.clear()
        with self._lock:  # their SUBACKs will never come; on_connect re-subscribes
            pending, self._pending_subs = list(self._pending_subs.values()), {}
        for sub in pending:
            sub.done.set()
        if was_connected:
            if not self._closed:
                log.warning("lost connection to %s: %s", self.settings.url, reason.getName())
            self._notify(False)

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        # Runs before paho marks the message published, so a waiting publish() sees it.
        # Every PUBACK overwrites its mid's entry: a stale refusal never outlives the mid.
        with self._pub_lock:
            if reason.is_failure:
                self._pub_refusals[mid] = reason
            else:
                self._pub_refusals.pop(mid, None)
        if reason.is_failure:
            log.warning("broker refused publish (mid %d): %s", mid, reason.getName())

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        with self._lock:
            pending = self._pending_subs.pop(mid, None)
        if pending is None:
            return
        for topic_filter, reason in zip(pending.filters, reasons, strict=False):
            if reason.is_failure:
                pending.refused.append(topic_filter)
                log.warning("broker refused subscription %s: %s", topic_filter, reason.getName())
        pending.done.set()

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:
                self.handler_errors += 1
                log.exception("connection listener raised")
