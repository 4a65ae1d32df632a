"""Which key set each device trusts, from the fleet's retained device states.

Before a key is retired every device should trust a key set holding its replacement;
otherwise it refuses everything signed from then on. Agents report the key set version
they trust in their retained state (``key_set_version``; a last will carries the version
of its connect, so it may lag).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

from fogline.protocol import (
    DecodeError,
    DeviceState,
    FoglineError,
    MqttMessage,
    MqttTransport,
    TopicError,
    Topics,
    decode,
)

__all__ = ["DeviceKeys", "KeyAdoption", "read_key_adoption"]


@dataclass(frozen=True)
class DeviceKeys:
    device_id: str
    status: str  # online or offline
    key_set_version: int | None  # None: an agent that does not report it

    def trusts(self, version: int) -> bool:
        return self.key_set_version is not None and self.key_set_version >= version

    def as_dict(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "status": self.status,
            "key_set_version": self.key_set_version,
        }


@dataclass(frozen=True)
class KeyAdoption:
    """Every device with a retained state, and the messages that could not be read."""

    devices: list[DeviceKeys] = field(default_factory=list)
    ignored_messages: int = 0

    def lagging(self, version: int) -> list[DeviceKeys]:
        """The devices that do not (as far as they reported) trust key set ``version``."""
        return [d for d in self.devices if not d.trusts(version)]


def read_key_adoption(
    transport: MqttTransport,
    topics: Topics | None = None,
    *,
    quiet_s: float = 0.3,
    max_s: float = 5.0,
) -> KeyAdoption:
    """Read the retained device states: subscribe, wait until none arrived for
    ``quiet_s`` (at most ``max_s``), unsubscribe."""
    topics = topics or Topics()
    states: dict[str, DeviceState] = {}
    ignored = 0
    lock = threading.Lock()
    arrived = threading.Event()

    def on_state(msg: MqttMessage) -> None:
        nonlocal ignored
        arrived.set()
        if not msg.payload:
            return  # a cleared retained state: the device was forgotten
        try:
            device_id = topics.parse(msg.topic).device_id
            state = decode(msg.payload, DeviceState)
        except (TopicError, DecodeError):
            with lock:
                ignored += 1
            return
        with lock:
            if state.device_id != device_id:
                ignored += 1
            else:
                states[state.device_id] = state

    topic_filter = topics.all_device("state")
    transport.subscribe(topic_filter, on_state, qos=1, wait=True)
    try:
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            arrived.clear()
            if not arrived.wait(quiet_s):
                break
    finally:
        with contextlib.suppress(FoglineError):
            transport.unsubscribe(topic_filter)
    with lock:
        devices = [
            DeviceKeys(s.device_id, s.status, s.key_set_version)
            for s in sorted(states.values(), key=lambda s: s.device_id)
        ]
        return KeyAdoption(devices, ignored)
