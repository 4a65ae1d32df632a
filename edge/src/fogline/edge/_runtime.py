"""ONNX Runtime sessions: load, warm up, self-test, validate inputs, swap atomically.

A :class:`ModelSlot` holds one immutable :class:`LoadedModel`. A request reads the slot
once and runs on what it got, so a swap never disturbs requests in flight: they finish
on the old session, which is freed when the last of them drops its reference.

onnxruntime exceptions become Fogline errors in :func:`_translate_ort` only.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fogline.protocol import (
    FoglineError,
    InferenceInputError,
    InvalidModelError,
    ModelError,
    Tensor,
    TensorSpec,
)

__all__ = ["LoadedModel", "ModelSlot", "SessionCache", "load_model", "run_model", "self_test"]

log = logging.getLogger("fogline.edge.runtime")

_ORT_DTYPES = {
    "tensor(bool)": "bool",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}
_WARMUP_RUNS = 3


def glibc() -> Any:
    """The C library as a ctypes handle when it is glibc (whose malloc the agent tunes),
    else None (other platforms, musl): the tuning is then skipped."""
    global _glibc
    if _glibc is False:
        _glibc = None
        if sys.platform.startswith("linux"):
            try:
                if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
                    import ctypes

                    _glibc = ctypes.CDLL(None)
            except (OSError, ValueError):
                pass
    return _glibc


_glibc: Any = False  # not looked up yet
_trim_after_swaps = False


def release_freed_heap() -> bool:
    """``malloc_trim(0)``: hand the heap's free pages back to the OS. glibc returns only
    the top of its main heap by itself, so what imports, model parsing and a replaced
    session freed in the middle stays resident. A no-op (False) off glibc."""
    libc = glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def trim_heap_after_swaps(enabled: bool = True) -> None:
    """Trim the heap when a replaced model is freed. For a process that runs one agent
    (``fogline-edge run``); off by default, as a process with a simulated fleet swaps
    often and each trim walks the whole heap."""
    global _trim_after_swaps
    _trim_after_swaps = enabled


def _translate_ort(exc: Exception, action: str) -> FoglineError:
    """The one place where onnxruntime's exceptions become Fogline errors."""
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    if name in ("InvalidArgument", "InvalidProtobuf") and action == "run":
        return InferenceInputError(f"onnxruntime rejected the inputs: {text}")
    if action == "run":
        return ModelError(f"inference failed: {name}: {text}")
    return InvalidModelError(f"{action}: {name}: {text}")


@dataclass(frozen=True)
class _InputCheck:
    name: str
    dtype: np.dtype[Any]
    rank: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every non-dynamic axis


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A ready session and what it serves. Immutable; replaced whole on a swap."""

    name: str
    version: int
    sha256: str
    session: Any  # onnxruntime.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    checks: tuple[_InputCheck, ...]
    path: Path | None = None
    # True when the manifest fixes an axis the model leaves dynamic: ORT alone would
    # accept inputs the manifest forbids, so inputs are checked in Python first.
    strict: bool = False
    output_list: list[str] = field(default_factory=list)
    run: Callable[[list[str], dict[str, Any], Any], list[np.ndarray]] | None = None


class ModelSlot:
    """The currently served model of one name; ``current`` is read without a lock."""

    __slots__ = ("__weakref__", "_lock", "current")

    def __init__(self, model: LoadedModel | None = None) -> None:
        self.current: LoadedModel | None = model
        self._lock = threading.Lock()

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` current; returns the one it replaced. A single attribute store
        is atomic, so readers see either the old or the new model, never a mix."""
        with self._lock:
            old, self.current = self.current, model
        if old is not None and _trim_after_swaps:
            # When the last request in flight lets go of the old session.
            weakref.finalize(old, release_freed_heap)
        return old


class SessionCache:
    """Shares loaded sessions between agents of one process (simulated fleets), keyed
    by (artifact sha256, intra-op threads). Entries vanish when no agent uses them.

    ``allow_spinning=False`` makes the sessions' intra-op workers sleep between runs
    instead of spin-waiting for more work (ONNX Runtime's default): right for a device
    whose cores are its own, wasteful where many agents share a host's few cores."""

    def __init__(self, *, allow_spinning: bool = True) -> None:
        self.allow_spinning = allow_spinning
        self._sessions: weakref.WeakValueDictionary[tuple[str, int], Any] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

    def get_or_load(self, sha256: str, threads: int, path: Path) -> Any:
        key = (sha256, threads)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = _new_session(path, threads, allow_spinning=self.allow_spinning)
                self._sessions[key] = session
            return session

    def __len__(self) -> int:
        return len(self._sessions)


def _new_session(path: Path, threads: int, *, allow_spinning: bool = True) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _translate_ort(exc, f"cannot load {path.name}") from None


def _specs_from_session(items: Sequence[Any]) -> tuple[TensorSpec, ...]:
    specs = []
    for item in items:
        dtype = _ORT_DTYPES.get(item.type)
        if dtype is None:
            raise InvalidModelError(f"tensor {item.name!r} has unsupported type {item.type}")
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (item.shape or [])]
        specs.append(TensorSpec(name=item.name, dtype=dtype, shape=shape))  # type: ignore[arg-type]
    return tuple(specs)


def _compatible(declared: Sequence[TensorSpec], actual: Sequence[TensorSpec], what: str) -> None:
    """The manifest's specs must describe the session: same names, dtypes and ranks, and
    no fixed axis that the model contradicts."""
    by_name = {s.name: s for s in actual}
    if set(by_name) != {s.name for s in declared}:
        raise InvalidModelError(
            f"{what} names {sorted(s.name for s in declared)} in the manifest do not match "
            f"the model's {sorted(by_name)}"
        )
    for spec in declared:
        real = by_name[spec.name]
        if real.dtype != spec.dtype or len(real.shape) != len(spec.shape):
            raise InvalidModelError(
                f"{what} {spec.name!r}: manifest says {spec.dtype}{spec.shape}, "
                f"model has {real.dtype}{real.shape}"
            )
        for want, have in zip(spec.shape, real.shape, strict=True):
            if want != -1 and have != -1 and want != have:
                raise InvalidModelError(f"{what} {spec.name!r}: axis {want} vs model {have}")


def load_model(
    name: str,
    version: int,
    sha256: str,
    path: Path,
    *,
    threads: int,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    cache: SessionCache | None = None,
) -> LoadedModel:
    """Load an ONNX file with the device's thread budget and warm it up. ``inputs`` and
    ``outputs`` (the manifest's specs) are checked against the model; by default the
    model's own are used. Raises :class:`InvalidModelError`."""
    if cache is not None:
        session = cache.get_or_load(sha256, threads, path)
    else:
        session = _new_session(path, threads)
    real_in = _specs_from_session(session.get_inputs())
    real_out = _specs_from_session(session.get_outputs())
    if inputs is not None:
        _compatible(inputs, real_in, "input")
    if outputs is not None:
        _compatible(outputs, real_out, "output")
    in_specs = tuple(inputs) if inputs is not None else real_in
    out_specs = tuple(outputs) if outputs is not None else real_out
    strict = _stricter(in_specs, real_in)
    checks = tuple(
        _InputCheck(
            s.name,
            np.dtype(s.dtype),
            len(s.shape),
            tuple((i, d) for i, d in enumerate(s.shape) if d != -1),
        )
        for s in in_specs
    )
    model = LoadedModel(
        name=name,
        version=version,
        sha256=sha256,
        session=session,
        inputs=in_specs,
        outputs=out_specs,
        output_names=tuple(s.name for s in out_specs),
        checks=checks,
        path=path,
        strict=strict,
        output_list=[s.name for s in out_specs],
        run=_runner(session),
    )
    _warm_up(model)
    return model


def _runner(session: Any) -> Callable[[list[str], dict[str, Any], Any], list[np.ndarray]]:
    """The fastest way to run ``session``. ``InferenceSession.run`` re-validates the
    feed in Python on every call (2-3 us, as much as our whole overhead budget on a
    20 us model); its C++ binding ``_sess.run`` validates names, dtypes and shapes
    anyway. Fall back to the public method if a future onnxruntime renames it, and for
    anything that is not an ``InferenceSession`` (a wrapper, such as the simulator's slow
    device, must have its own ``run`` called, not its inner session's binding)."""
    if not isinstance(session, ort.InferenceSession):
        return lambda names, feed, options: session.run(names, feed, options)
    binding = getattr(session, "_sess", None)
    run = getattr(binding, "run", None)
    if callable(run):
        return run  # type: ignore[no-any-return]
    return lambda names, feed, options: session.run(names, feed, options)


def _stricter(declared: Sequence[TensorSpec], actual: Sequence[TensorSpec]) -> bool:
    by_name = {s.name: s for s in actual}
    return any(
        want != -1 and have == -1
        for spec in declared
        for want, have in zip(spec.shape, by_name[spec.name].shape, strict=True)
    )


def _example_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    """Zeros of each input's shape, dynamic axes set to 1."""
    return {
        s.name: np.zeros([d if d != -1 else 1 for d in s.shape], dtype=np.dtype(s.dtype))
        for s in model.inputs
    }


def _warm_up(model: LoadedModel) -> None:
    feed = _example_inputs(model)
    for _ in range(_WARMUP_RUNS):
        try:
            model.session.run(None, feed)
        except Exception as exc:
            raise InvalidModelError(
                f"warm-up run failed: {_translate_ort(exc, 'run').message}"
            ) from None


def self_test(model: LoadedModel, example: Mapping[str, Tensor] | None) -> None:
    """Run the manifest's example input (or zeros): outputs must be finite and match the
    output specs. Raises :class:`InvalidModelError`."""
    try:
        feed = {k: v.to_numpy() for k, v in example.items()} if example else _example_inputs(model)
        outputs = run_model(model, feed)
    except FoglineError as exc:
        raise InvalidModelError(f"self-test run failed: {exc.message}") from None
    for spec in model.outputs:
        out = outputs[spec.name]
        if out.dtype != np.dtype(spec.dtype):
            raise InvalidModelError(
                f"self-test: output {spec.name!r} is {out.dtype}, expected {spec.dtype}"
            )
        if out.ndim != len(spec.shape) or any(
            d != -1 and d != real for d, real in zip(spec.shape, out.shape, strict=False)
        ):
            raise InvalidModelError(
                f"self-test: output {spec.name!r} has shape {list(out.shape)}, not {spec.shape}"
            )
        if out.dtype.kind == "f" and not bool(np.isfinite(out).all()):
            raise InvalidModelError(f"self-test: output {spec.name!r} is not finite")


def _mismatch(model: LoadedModel, inputs: Mapping[str, Any]) -> InferenceInputError | None:
    """Explain why ``inputs`` do not fit ``model``, or None if they do (slow path)."""
    expected = {c.name for c in model.checks}
    missing, extra = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
    if missing or extra:
        return InferenceInputError(
            f"model {model.name!r} takes {sorted(expected)}: missing {missing}, unknown {extra}"
        )
    for check in model.checks:
        value = inputs[check.name]
        spec = next(s for s in model.inputs if s.name == check.name)
        if not isinstance(value, np.ndarray):
            kind = type(value).__name__
            return InferenceInputError(f"input {check.name!r} must be a numpy array, got {kind}")
        if value.dtype != check.dtype:
            return InferenceInputError(
                f"input {check.name!r} must be {check.dtype}, got {value.dtype}"
            )
        if value.ndim != check.rank or any(value.shape[i] != d for i, d in check.fixed):
            return InferenceInputError(
                f"input {check.name!r} has shape {list(value.shape)}, expected {spec.shape}"
            )
    return None


def run_model(model: LoadedModel, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run ``model`` on ``inputs``. Hot path: ONNX Runtime checks names, dtypes and
    shapes itself (in C++); only when it refuses do we work out a clear message. Models
    whose manifest is stricter than the ONNX graph are checked in Python first."""
    if inputs.__class__ is not dict:
        inputs = dict(inputs)
    if model.strict:
        problem = _mismatch(model, inputs)
        if problem is not None:
            raise problem
    try:
        outputs = model.run(model.output_list, inputs, None)  # type: ignore[misc]
    except Exception as exc:
        raise (_mismatch(model, inputs) or _translate_ort(exc, "run")) from None
    if len(outputs) == 1:
        return {model.output_list[0]: outputs[0]}
    return dict(zip(model.output_names, outputs, strict=False))
