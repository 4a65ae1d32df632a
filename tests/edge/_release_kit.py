"""Test helpers for the edge agent: a real ONNX model built without torch, a signer, a
tiny artifact service over a real MqttTransport, and an observer of device topics.

Until the cloud tier publishes releases, these stand in for it using only the protocol
package (sign_release, sign_desired, ChunkRequest/ArtifactChunk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fogline.protocol import (
    ArtifactChunk,
    ChunkRequest,
    DecodeError,
    DesiredModel,
    DesiredState,
    DeviceEvent,
    DeviceState,
    ErrorReply,
    Heartbeat,
    Message,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    ReleaseManifest,
    ReleaseVariant,
    SignedRelease,
    SigningKey,
    Tensor,
    TensorSpec,
    Topics,
    decode,
    encode,
    sign_desired,
    sign_release,
)

INPUT_SHAPE = (1, 1, 8, 8)


def build_model(seed: int = 0, channels: int = 8, classes: int = 10, nan: bool = False) -> bytes:
    """A small CNN (Conv 3x3 -> ReLU -> Flatten -> Gemm) for 1x1x8x8 -> ``classes``
    logits, with random weights; dynamic batch axis. ``nan=True`` makes its outputs NaN
    (for self-test failures)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(channels).astype(np.float32)
    w2 = (rng.standard_normal((channels * 64, classes)) * 0.1).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)
    if nan:
        b2[:] = np.nan
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fogline_test_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def sample_input(seed: int = 1, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 1, 8, 8), dtype=np.float32)


INPUT_SPECS = [TensorSpec(name="input", dtype="float32", shape=[-1, 1, 8, 8])]
OUTPUT_SPECS = [TensorSpec(name="logits", dtype="float32", shape=[-1, 10])]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ReleaseKit:
    """Signs releases and desired states like the cloud tier would."""

    topics: Topics
    key: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def public_key(self) -> str:
        return self.key.public_key.to_text()

    def release(
        self,
        model: str,
        version: int,
        artifact: bytes,
        *,
        device_class: str = "generic",
        chunk_size: int = 4096,
        expires_in: float = 3600.0,
        key: SigningKey | None = None,
        example: bool = True,
    ) -> SignedRelease:
        now = time.time()
        manifest = ReleaseManifest(
            model=model,
            version=version,
            created_at=now,
            expires_at=max(0.0, now + expires_in),
            key_id="unsigned",
            variants=[
                ReleaseVariant(
                    device_class=device_class,
                    quantization="fp32",
                    sha256=sha256(artifact),
                    size=len(artifact),
                    chunk_size=chunk_size,
                    inputs=INPUT_SPECS,
                    outputs=OUTPUT_SPECS,
                )
            ],
            example_input={"input": Tensor.from_numpy(sample_input())} if example else None,
        )
        return sign_release(manifest, key or self.key)

    def desired(
        self,
        scope: str,
        models: dict[str, int],
        *,
        sequence: int,
        target: str | None = None,
        allow_rollback: bool = False,
        key: SigningKey | None = None,
    ) -> Any:
        state = DesiredState(
            scope=scope,  # type: ignore[arg-type]
            target=target,
            sequence=sequence,
            issued_at=time.time(),
            key_id="unsigned",
            models={
                m: DesiredModel(version=v, allow_rollback=allow_rollback) for m, v in models.items()
            },
        )
        return sign_desired(state, key or self.key)


def publish(transport: MqttTransport, topic: str, message: Message, retain: bool = True) -> None:
    transport.publish(topic, encode(message), qos=1, retain=retain, wait=True)


class ArtifactServer:
    """Answers ChunkRequests from a dict of artifacts over a real MqttTransport.

    ``delay_s`` throttles each chunk; ``tamper`` maps (sha, offset) to a function that
    alters the chunk bytes (its chunk hash is recomputed, so only the whole-file check
    catches it) ; ``requests`` counts requests per (sha, offset).
    """

    def __init__(self, settings: MqttSettings, topics: Topics) -> None:
        self.topics = topics
        self.artifacts: dict[str, bytes] = {}
        self.delay_s = 0.0
        self.tamper: dict[tuple[str, int], Callable[[bytes], bytes]] = {}
        # Damage after the chunk's own hash was taken (in transit), once per entry.
        self.garble_once: dict[tuple[str, int], Callable[[bytes], bytes]] = {}
        self.requests: Counter[tuple[str, int]] = Counter()
        self._queue: queue.Queue[ChunkRequest | None] = queue.Queue()
        self._transport = MqttTransport(
            settings, client_id=f"artifact-server-{uuid.uuid4().hex[:8]}"
        )
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def add(self, data: bytes) -> str:
        digest = sha256(data)
        self.artifacts[digest] = data
        return digest

    def start(self) -> ArtifactServer:
        self._transport.subscribe(self.topics.all_artifact_gets(), self._on_request, qos=1)
        self._transport.connect()
        self._thread.start()
        return self

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._transport.close()

    def _on_request(self, msg: MqttMessage) -> None:
        with contextlib.suppress(DecodeError):
            self._queue.put(decode(msg.payload, ChunkRequest))

    def _serve(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            self.requests[(req.sha256, req.offset)] += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            data = self.artifacts.get(req.sha256)
            reply: Message
            if data is None:
                reply = ErrorReply(
                    correlation_id=req.correlation_id, code="artifact_error", message="unknown"
                )
            else:
                chunk = data[req.offset : req.offset + req.length]
                fn = self.tamper.get((req.sha256, req.offset))
                if fn is not None:
                    chunk = fn(chunk)
                claim = sha256(chunk)
                garble = self.garble_once.pop((req.sha256, req.offset), None)
                reply = ArtifactChunk(
                    correlation_id=req.correlation_id,
                    sha256=req.sha256,
                    offset=req.offset,
                    total_size=len(data),
                    chunk_sha256=claim,
                    data=chunk if garble is None else garble(chunk),
                )
            with contextlib.suppress(Exception):
                self._transport.publish(req.reply_to, encode(reply), qos=1)


class Observer:
    """Collects every decoded message on a device's state/heartbeat/events topics."""

    def __init__(
        self,
        settings: MqttSettings,
        topics: Topics,
        device_id: str,
        client_id: str | None = None,
        clean_session: bool = True,
    ) -> None:
        self.topics = topics
        self.device_id = device_id
        self.messages: list[tuple[str, Message, bool]] = []
        self._cond = threading.Condition()
        self.transport = MqttTransport(
            settings,
            client_id=client_id or f"observer-{uuid.uuid4().hex[:8]}",
            clean_session=clean_session,
        )
        for topic in (
            topics.device_state(device_id),
            topics.heartbeat(device_id),
            topics.events(device_id),
        ):
            self.transport.subscribe(topic, self._on_message, qos=1)

    def start(self) -> Observer:
        self.transport.connect()
        return self

    def close(self) -> None:
        self.transport.close()

    def _on_message(self, msg: MqttMessage) -> None:
        if not msg.payload:
            return
        decoded = decode(msg.payload)
        with self._cond:
            self.messages.append((msg.topic, decoded, msg.retain))
            self._cond.notify_all()

    def of(self, kind: type[Message]) -> list[Any]:
        with self._cond:
            return [m for _t, m, _r in self.messages if isinstance(m, kind)]

    def events(self, **match: Any) -> list[DeviceEvent]:
        return [
            e for e in self.of(DeviceEvent) if all(getattr(e, k) == v for k, v in match.items())
        ]

    def heartbeats(self) -> list[Heartbeat]:
        return self.of(Heartbeat)

    def states(self) -> list[DeviceState]:
        return self.of(DeviceState)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate_value(predicate)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting; saw {self.summary()}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_event(self, timeout: float = 15.0, **match: Any) -> DeviceEvent:
        events: list[DeviceEvent] = self.wait_for(lambda: self.events(**match), timeout)
        return events[0]

    def summary(self) -> list[str]:
        out = []
        for _t, m, _r in self.messages[-30:]:
            if isinstance(m, DeviceEvent):
                out.append(f"event:{m.kind}:{m.model}:{m.version}:{m.reason}")
            elif isinstance(m, DeviceState):
                out.append(f"state:{m.status}")
            elif isinstance(m, Heartbeat):
                out.append(f"hb:{m.seq}:{m.models}")
        return out


def predicate_value(predicate: Callable[[], Any]) -> Any:
    try:
        return predicate()
    except (KeyError, IndexError):
        return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for agent configs (scalars, lists, nested tables)."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and v is not None
    ]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines.append(f"\n[{name}]")
            lines.append(to_toml(value, name + "."))
    return "\n".join(lines)


def spawn_agent(
    config: Any, path: Path, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Run ``fogline-edge run`` on ``config`` in a subprocess (own session, killed at teardown)."""
    path.write_text(to_toml(config.model_dump(mode="json", exclude_none=True)))
    exe = Path(sys.executable).with_name("fogline-edge")
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=path.with_suffix(".log").open("ab"),  # the agent's log, for post-mortems
        start_new_session=True,
    )
    processes.append(proc)
    return proc


def read_ready(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the agent exited before it was ready"
    ready: dict[str, object] = json.loads(line)
    assert ready["event"] == "ready"
    return ready
