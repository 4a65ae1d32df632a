"""The release pipeline: train (or import) → export → quantize → measure → gate →
register. Publishing is a separate step (:func:`publish_release`).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fogline.protocol import InvalidModelError, validate_id

from ._config import CloudSettings, load_settings
from ._gate import GateDecision, VariantMeasurement, choose_variants
from ._progress import make_progress
from ._registry import ModelRecord, Registry

__all__ = ["PipelineResult", "import_model", "run_pipeline"]

log = logging.getLogger("fogline.cloud.pipeline")

BATCHES = (1, 32)


@dataclass
class PipelineResult:
    record: ModelRecord
    measurements: list[VariantMeasurement]
    decisions: dict[str, GateDecision]
    history: list[dict[str, float]] = field(default_factory=list)


def _fogline_version() -> str:
    try:
        return version("fogline-cloud")
    except PackageNotFoundError:
        return "unknown"


def _measure_all(
    variants: dict[str, Path],
    inputs: np.ndarray,
    labels: np.ndarray | None,
    settings: CloudSettings,
    batches: tuple[int, ...],
    repeats: int,
    progress: bool,
    console: Console | None,
) -> list[VariantMeasurement]:
    from ._measure import MeasureJob, measure_variant, top1
    from ._ray_backend import map_tasks, task_cpus

    reference = None
    if labels is None:  # unlabeled: agreement with fp32 is the accuracy metric
        from ._export import session

        sess = session(variants["fp32"])
        name = sess.get_inputs()[0].name
        reference = top1(
            np.concatenate(
                [sess.run(None, {name: inputs[i : i + 256]})[0] for i in range(0, len(inputs), 256)]
            )
        )
    threads = tuple(sorted({c.threads for c in settings.device_classes}))
    jobs = [
        MeasureJob(q, str(p), inputs, labels, reference, threads, batches, repeats)
        for q, p in variants.items()
    ]
    # Reserve as many CPUs as the largest thread budget (capped by the cluster) so
    # parallel measurements do not distort each other more than the cluster must.
    cpus = task_cpus(max(threads))
    with make_progress(progress, console) as bar:
        task = bar.add_task("measure", total=len(jobs), info="variants as Ray tasks")

        def done(m: VariantMeasurement) -> None:
            bar.update(task, advance=1, info=f"{m.quantization}: {m.metric} {m.accuracy:.2f}%")

        return map_tasks(measure_variant, jobs, num_cpus=cpus, on_done=done)


def _quantize_gate_register(
    *,
    name: str,
    fp32: Path,
    workdir: Path,
    inputs: np.ndarray,
    labels: np.ndarray | None,
    settings: CloudSettings,
    registry: Registry,
    source: str,
    lineage: dict[str, Any],
    card: dict[str, Any],
    class_labels: list[str] | None,
    batches: tuple[int, ...],
    repeats: int,
    progress: bool,
    console: Console | None,
) -> PipelineResult:
    from ._export import load_checked_onnx, onnx_io
    from ._quantize import VARIANTS, build_variants

    model_io = onnx_io(load_checked_onnx(fp32))
    input_name = model_io[0][0].name
    with make_progress(progress, console) as bar:
        task = bar.add_task("quantize", total=len(VARIANTS) - 1, info="")
        variants, failed = build_variants(
            fp32,
            inputs,
            input_name,
            workdir / "variants",
            on_step=lambda v: bar.update(task, advance=1, info=v),
        )
    measurements = _measure_all(
        variants, inputs, labels, settings, batches, repeats, progress, console
    )
    decisions = choose_variants(
        measurements,
        settings.device_classes,
        accuracy_budget=settings.accuracy_budget,
        batches=batches,
    )
    card = {
        **card,
        "accuracy_budget_points": settings.accuracy_budget,
        "batches": list(batches),
        "device_classes": [c.model_dump() for c in settings.device_classes],
        "measurements": [m.to_dict() for m in measurements],
        "variants_not_built": failed,
        "gate": {k: d.to_dict() for k, d in decisions.items()},
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }
    assignments = {k: d.chosen for k, d in decisions.items() if d.chosen is not None}
    record = registry.register(
        name,
        artifacts=variants,
        assignments=assignments,
        inputs=model_io[0],
        outputs=model_io[1],
        source=source,
        lineage=lineage,
        card=card,
        labels=class_labels,
        example_input={input_name: np.ascontiguousarray(inputs[:1])},
    )
    return PipelineResult(record, measurements, decisions)


def run_pipeline(
    recipe: str,
    *,
    epochs: int = 5,
    workers: int = 1,
    seed: int = 0,
    name: str | None = None,
    settings: CloudSettings | None = None,
    registry: Registry | None = None,
    progress: bool = True,
    console: Console | None = None,
    repeats: int = 100,
) -> PipelineResult:
    """Train ``recipe`` on Ray, export, quantize, measure, gate and register it.

    Uses the running Ray if there is one (else joins ``$RAY_ADDRESS`` or starts a local
    one, and shuts it down after)."""
    from ._export import check_parity, export_onnx
    from ._ray_backend import ray_runtime
    from .training._ray_train import train_on_ray
    from .training._recipes import resolve_recipe

    settings = settings or load_settings()
    registry = registry or Registry(settings.data_dir)
    entry_point = resolve_recipe(recipe)
    model_name = validate_id(
        name or (recipe if ":" not in recipe else recipe.rsplit(":", 1)[1].replace("_", "-")),
        "model name",
    )
    with ray_runtime(), tempfile.TemporaryDirectory(prefix="fogline-pipeline-") as tmp:
        trained = train_on_ray(
            entry_point,
            epochs=epochs,
            workers=workers,
            seed=seed,
            storage_dir=settings.data_dir / "ray_results",
            progress=progress,
            console=console,
        )
        r = trained.recipe
        fp32 = export_onnx(
            r.model,
            r.example_input,
            Path(tmp) / "model.onnx",
            input_name=r.input_name,
            output_name=r.output_name,
        )
        holdout = np.ascontiguousarray(r.holdout_inputs, dtype=np.float32)
        parity = check_parity(fp32, r.model, holdout)
        lineage = {
            "recipe": recipe,
            "entry_point": entry_point,
            "config": {**r.config, "epochs": epochs, "workers": workers, "seed": seed},
            "data_hash": r.data_hash,
            "fogline_version": _fogline_version(),
        }
        card = {
            "training": {"history": trained.history, "epochs": epochs, "workers": workers},
            "export": {"parity_max_abs_diff": parity, "holdout_size": len(holdout)},
        }
        result = _quantize_gate_register(
            name=model_name,
            fp32=fp32,
            workdir=Path(tmp),
            inputs=holdout,
            labels=r.holdout_labels,
            settings=settings,
            registry=registry,
            source="trained",
            lineage=lineage,
            card=card,
            class_labels=r.labels,
            batches=BATCHES,
            repeats=repeats,
            progress=progress,
            console=console,
        )
    result.history = trained.history
    return result


def _load_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"calibration data {path} is not a .npy array: {exc}") from None
    if not isinstance(data, np.ndarray) or data.ndim < 1 or len(data) == 0:
        raise InvalidModelError(f"calibration data {path} must be a non-empty array")
    return data


def import_model(
    path: Path,
    *,
    name: str,
    calibration: Path | None = None,
    labels: Path | None = None,
    settings: CloudSettings | None = None,
    registry: Registry | None = None,
    progress: bool = True,
    console: Console | None = None,
    repeats: int = 100,
) -> PipelineResult:
    """Import a user's ONNX file: check it, quantize (calibrated on ``calibration``, a
    ``.npy`` batch of inputs), measure, gate and register. Without labels the accuracy
    metric is top-1 agreement with fp32."""
    from ._export import load_checked_onnx, onnx_io, session
    from ._ray_backend import ray_runtime

    settings = settings or load_settings()
    validate_id(name, "model name")
    model = load_checked_onnx(path)
    inputs_spec, _ = onnx_io(model)
    if len(inputs_spec) != 1:
        raise InvalidModelError(
            f"{path}: models with one input are supported, got {len(inputs_spec)}"
        )
    sess = session(path)  # ORT must load it too, before anything is registered
    spec = inputs_spec[0]
    if calibration is not None:
        data = _load_npy(calibration)
    else:
        if any(d < 0 for d in spec.shape[1:]):
            raise InvalidModelError(f"{path}: give --calibration data for dynamic input shapes")
        rng = np.random.default_rng(0)
        log.warning("no calibration data: using random inputs (accuracy is then agreement only)")
        data = rng.standard_normal((64, *spec.shape[1:]))
    data = np.ascontiguousarray(data, dtype=np.dtype(spec.dtype))
    try:
        sess.run(None, {spec.name: data[:1]})
    except Exception as exc:
        raise InvalidModelError(
            f"calibration data does not fit input {spec.name}: {str(exc)[:200]}"
        ) from None
    label_array = _load_npy(labels).astype(np.int64) if labels is not None else None
    if label_array is not None and len(label_array) != len(data):
        raise InvalidModelError("labels and calibration data have different lengths")
    batches = BATCHES if spec.shape and spec.shape[0] == -1 else (max(spec.shape[0], 1),)
    registry = registry or Registry(settings.data_dir)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    lineage = {
        "recipe": f"import:{Path(path).name}",
        "config": {"calibration": str(calibration) if calibration else None},
        "data_hash": hashlib.sha256(data.tobytes()).hexdigest(),
        "source_sha256": digest,
        "fogline_version": _fogline_version(),
    }
    with ray_runtime(), tempfile.TemporaryDirectory(prefix="fogline-import-") as tmp:
        return _quantize_gate_register(
            name=name,
            fp32=Path(path),
            workdir=Path(tmp),
            inputs=data,
            labels=label_array,
            settings=settings,
            registry=registry,
            source="imported",
            lineage=lineage,
            card={"import": {"file": Path(path).name, "sha256": digest}},
            class_labels=None,
            batches=batches,
            repeats=repeats,
            progress=progress,
            console=console,
        )
