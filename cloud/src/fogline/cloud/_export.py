"""Export a torch model to ONNX (dynamic batch axis), check it, and check parity.

Uses the torch.export-based exporter (the default since torch 2.9; the TorchScript one
is deprecated). ONNX/ORT load errors are translated to Fogline errors here and in
:func:`load_checked_onnx`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fogline.protocol import DType, InvalidModelError, TensorSpec, TrainingError

__all__ = ["check_parity", "export_onnx", "load_checked_onnx", "onnx_io", "session"]

log = logging.getLogger("fogline.cloud.export")

_ONNX_DTYPES: dict[int, DType] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress and warns about optional torchvision ops."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Export with a dynamic batch axis to one self-contained file and run the checker."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example_input,),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                optimize=True,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise TrainingError(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
    load_checked_onnx(path)
    return path


def load_checked_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; :class:`InvalidModelError` for anything wrong."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except FileNotFoundError:
        raise InvalidModelError(f"{path}: no such file") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path} is not a valid ONNX model: {first[:300]}") from None
    if not model.graph.input or not model.graph.output:
        raise InvalidModelError(f"{path} has no graph inputs or outputs")
    return model


def onnx_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as wire TensorSpecs (``-1`` for dynamic axes)."""
    initializers = {i.name for i in model.graph.initializer}

    def specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dtype = _ONNX_DTYPES.get(tensor.elem_type)
            if dtype is None:
                raise InvalidModelError(f"tensor {value.name!r} has an unsupported element type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            try:
                out.append(TensorSpec(name=value.name, dtype=dtype, shape=dims))
            except ValueError as exc:
                raise InvalidModelError(f"tensor {value.name!r}: {exc}") from None
        return out

    return specs(list(model.graph.input)), specs(list(model.graph.output))


def session(path: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """An ORT CPU session with a thread budget; load failures are InvalidModelError."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidModelError(f"ONNX Runtime cannot load the model: {str(exc)[:300]}") from None


def check_parity(
    path: Path,
    model: torch.nn.Module,
    inputs: np.ndarray,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Compare ORT with torch on ``inputs``; :class:`TrainingError` beyond tolerance.

    Returns the largest absolute difference."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: inputs})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(inputs)).numpy()
    if got.shape != want.shape:
        raise TrainingError(f"parity: ONNX output shape {got.shape} != torch {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        raise TrainingError(
            f"parity check failed: ONNX Runtime differs from torch by up to {diff:.3g} "
            f"(atol {atol}, rtol {rtol}); release stopped"
        )
    return diff
