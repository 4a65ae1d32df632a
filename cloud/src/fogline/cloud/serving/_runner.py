"""ONNX Runtime inference for the cloud path, with micro-batching. No Ray here.

:meth:`OnnxRunner.run_batch` runs many requests in as few ``session.run`` calls as it
can: requests whose inputs agree on everything but the batch axis are concatenated,
run once and split again. A request with bad inputs gets its own error and does not
spoil the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fogline.protocol import FoglineError, InferenceInputError, InvalidModelError

__all__ = ["InputSpec", "OnnxRunner", "RunOutcome"]

log = logging.getLogger("fogline.cloud.serving")

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}

Outputs = dict[str, np.ndarray]
RunOutcome = Outputs | FoglineError


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]  # None: a dynamic axis

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and self.shape[0] is None


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


class OnnxRunner:
    """One ONNX Runtime session. ``model`` is the ONNX file's bytes or its path."""

    def __init__(self, model: bytes | Path, *, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        source = str(model) if isinstance(model, Path) else model
        try:
            self._session = ort.InferenceSession(
                source, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise InvalidModelError(f"ONNX Runtime cannot load the model: {exc}") from None
        inputs = []
        for item in self._session.get_inputs():
            dtype = _ORT_DTYPES.get(item.type)
            if dtype is None:
                raise InvalidModelError(f"input {item.name!r} has unsupported type {item.type}")
            inputs.append(InputSpec(item.name, np.dtype(dtype), tuple(_dim(d) for d in item.shape)))
        self.inputs: tuple[InputSpec, ...] = tuple(inputs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())
        self._batchable = all(spec.batch_dynamic for spec in self.inputs)

    def check(self, inputs: Mapping[str, Any]) -> None:
        """Raise :class:`InferenceInputError` unless ``inputs`` fit the model."""
        expected = {spec.name for spec in self.inputs}
        if set(inputs) != expected:
            raise InferenceInputError(
                f"model takes inputs {sorted(expected)}, got {sorted(map(str, inputs))}"
            )
        for spec in self.inputs:
            value = inputs[spec.name]
            if not isinstance(value, np.ndarray):
                raise InferenceInputError(f"input {spec.name!r} is not an array")
            if value.dtype != spec.dtype:
                raise InferenceInputError(
                    f"input {spec.name!r} must be {spec.dtype}, got {value.dtype}"
                )
            if value.ndim != len(spec.shape) or any(
                want is not None and want != got
                for want, got in zip(spec.shape, value.shape, strict=True)
            ):
                shape = ["?" if d is None else d for d in spec.shape]
                raise InferenceInputError(
                    f"input {spec.name!r} has shape {list(value.shape)}, expected {shape}"
                )
            if value.size == 0:
                raise InferenceInputError(f"input {spec.name!r} is empty")

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        self.check(inputs)
        return self._run(dict(inputs))

    def run_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[RunOutcome]:
        """Run every request; each gets its outputs or its own error."""
        outcomes: list[RunOutcome | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, request in enumerate(requests):
            try:
                self.check(request)
            except FoglineError as exc:
                outcomes[index] = exc
                continue
            key = tuple((s.name, request[s.name].shape[1:]) for s in self.inputs)
            groups.setdefault(key if self._batchable else (index,), []).append(index)
        for members in groups.values():
            results = self._run_group([requests[i] for i in members])
            for index, outcome in zip(members, results, strict=True):
                outcomes[index] = outcome
        return [o if o is not None else InferenceInputError("not run") for o in outcomes]

    def _run_group(self, group: list[Mapping[str, Any]]) -> list[RunOutcome]:
        if len(group) == 1:
            return [self._safe_run(dict(group[0]))]
        sizes = [int(r[self.inputs[0].name].shape[0]) for r in group]
        feed = {s.name: np.concatenate([r[s.name] for r in group]) for s in self.inputs}
        merged = self._safe_run(feed)
        if isinstance(merged, FoglineError):
            # One bad request must not fail its neighbours: retry them one by one.
            return [self._safe_run(dict(r)) for r in group]
        total = sum(sizes)
        if any(out.ndim == 0 or out.shape[0] != total for out in merged.values()):
            return [self._safe_run(dict(r)) for r in group]  # outputs not batch-major
        bounds = np.cumsum([0, *sizes])
        return [
            {name: out[bounds[i] : bounds[i + 1]] for name, out in merged.items()}
            for i in range(len(group))
        ]

    def _safe_run(self, feed: dict[str, np.ndarray]) -> RunOutcome:
        try:
            return self._run(feed)
        except FoglineError as exc:
            return exc

    def _run(self, feed: dict[str, np.ndarray]) -> Outputs:
        try:
            values = self._session.run(list(self.output_names), feed)
        except Exception as exc:  # onnxruntime's errors, translated here only
            raise InferenceInputError(f"ONNX Runtime rejected the inputs: {exc}") from None
        return {name: np.asarray(v) for name, v in zip(self.output_names, values, strict=True)}
