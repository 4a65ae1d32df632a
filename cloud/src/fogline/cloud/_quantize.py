"""Build the candidate variants of an fp32 ONNX model.

- ``fp32``: the model as exported;
- ``int8-static``: QDQ, calibrated on held-out data after ONNX Runtime's pre-processing
  (symbolic shape inference and graph optimisation);
- ``int8-dynamic``: weights int8, activations quantized at run time;
- ``fp16``: weights and compute in float16, float32 inputs and outputs kept.

A variant that cannot be built is left out with its reason (recorded in the model card);
whether a variant is *worth* shipping is the gate's job, on measurements.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

__all__ = ["VARIANTS", "build_variants"]

log = logging.getLogger("fogline.cloud.quantize")

VARIANTS = ("fp32", "int8-static", "int8-dynamic", "fp16")


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, input_name: str, data: np.ndarray, batch: int = 16) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: data[i : i + batch]} for i in range(0, len(data), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _topological_sort(model.graph)
    onnx.save(model, str(target))


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The fp16 converter appends the input casts at the end of the node list; ONNX
    wants nodes in dependency order."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def build_variants(
    fp32: Path,
    calibration: np.ndarray,
    input_name: str,
    workdir: Path,
    *,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Build every variant in ``workdir``: (quantization → file, quantization → why not)."""
    workdir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    failed: dict[str, str] = {}
    built["fp32"] = workdir / "fp32.onnx"
    shutil.copyfile(fp32, built["fp32"])
    pre = workdir / "fp32-pre.onnx"

    def attempt(name: str, make: Callable[[Path], None]) -> None:
        target = workdir / f"{name}.onnx"
        try:
            make(target)
            onnx.checker.check_model(str(target))
            built[name] = target
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("variant %s not built: %s", name, failed[name])
        if on_step is not None:
            on_step(name)

    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
    except Exception as exc:  # pre-processing is an optimisation; quantize without it
        log.warning("quantization pre-processing failed (%s); using the raw model", exc)
        shutil.copyfile(fp32, pre)

    attempt(
        "int8-static",
        lambda t: quantize_static(
            str(pre),
            str(t),
            _Calibration(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        ),
    )
    attempt(
        "int8-dynamic", lambda t: quantize_dynamic(str(pre), str(t), weight_type=QuantType.QInt8)
    )
    attempt("fp16", lambda t: _fp16(fp32, t))
    return built, failed
