"""Helpers for the serving tests: a tiny real ONNX classifier built with onnx.helper, and
MQTT transports that are always closed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# 4 features -> 3 classes. The logits are x @ W: an input with one large feature is a
# confident answer, an all-equal input an unsure one (softmax 1/3 each).
WEIGHTS = np.array(
    [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [1.0, 1.0, 1.0]], dtype=np.float32
)


def build_classifier() -> bytes:
    w = numpy_helper.from_array(WEIGHTS, name="W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ WEIGHTS
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CONFIDENT = np.array([[3.0, 0.0, 0.0, 0.0]], dtype=np.float32)
UNSURE = np.array([[1.0, 1.0, 1.0, 0.0]], dtype=np.float32)


@dataclass(frozen=True)
class Tiny:
    onnx: bytes
    confident: np.ndarray
    unsure: np.ndarray
    reference: Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny(build_classifier(), CONFIDENT, UNSURE, reference)


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """Liveness wait (not a timing assertion): fails only if it never happens."""
    return _wait_until
