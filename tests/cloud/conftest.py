"""Fixtures for the cloud tier's own tests (names start with ``cloud_``)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fogline.cloud import Registry
from fogline.protocol import MqttMessage, MqttSettings, MqttTransport


class Inbox:
    """A connected client that collects what arrives on its subscriptions."""

    def __init__(self, settings: MqttSettings) -> None:
        self.transport = MqttTransport(settings)
        self.transport.connect()
        self.messages: queue.Queue[MqttMessage] = queue.Queue()

    def listen(self, topic_filter: str) -> None:
        self.transport.subscribe(topic_filter, self.messages.put, qos=1)

    def get(self, timeout: float = 10.0) -> MqttMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def cloud_inbox(mqtt_settings: MqttSettings) -> Iterator[Callable[[], Inbox]]:
    made: list[Inbox] = []

    def make() -> Inbox:
        inbox = Inbox(mqtt_settings)
        made.append(inbox)
        return inbox

    try:
        yield make
    finally:
        for inbox in made:
            inbox.close()


@pytest.fixture
def cloud_registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "data")


def tiny_classifier(path: Path, features: int = 4, classes: int = 3, seed: int = 0) -> Path:
    """A dynamic-batch linear classifier as ONNX (MatMul + Add), built with onnx.helper."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [onnx.numpy_helper.from_array(weight, "W"), onnx.numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def cloud_tiny_classifier() -> Callable[..., Path]:
    """The :func:`tiny_classifier` builder (test modules cannot import conftest)."""
    return tiny_classifier
