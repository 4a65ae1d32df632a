"""Measure one variant: accuracy, median latency per thread budget and batch, size.

Pure ONNX Runtime, no Ray: the pipeline runs :func:`measure_variant` as Ray tasks.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._export import session
from ._gate import VariantMeasurement

__all__ = ["MeasureJob", "measure_variant", "top1"]


@dataclass(frozen=True)
class MeasureJob:
    quantization: str
    path: str
    inputs: np.ndarray
    labels: np.ndarray | None
    reference: np.ndarray | None
    threads: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int = 100
    warmup: int = 10


def top1(outputs: np.ndarray) -> np.ndarray:
    flat = outputs.reshape(outputs.shape[0], -1)
    best: np.ndarray = flat.argmax(axis=1)
    return best


def _predict(sess: object, name: str, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    run = sess.run  # type: ignore[attr-defined]
    parts = [run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(parts)


def _batch_of(inputs: np.ndarray, size: int) -> np.ndarray:
    if len(inputs) >= size:
        return np.ascontiguousarray(inputs[:size])
    reps = -(-size // max(len(inputs), 1))
    return np.ascontiguousarray(np.concatenate([inputs] * reps)[:size])


def _median_ms(sess: object, name: str, batch: np.ndarray, repeats: int, warmup: int) -> float:
    run = sess.run  # type: ignore[attr-defined]
    feed = {name: batch}
    for _ in range(warmup):
        run(None, feed)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(None, feed)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure_variant(job: MeasureJob) -> VariantMeasurement:
    """Accuracy on the holdout (percent correct, or percent top-1 agreement with
    ``reference`` when there are no labels) and latency under each thread budget."""
    sess = session(Path(job.path), threads=1)
    name = sess.get_inputs()[0].name
    predicted = top1(_predict(sess, name, job.inputs))
    if job.labels is not None:
        accuracy, metric = 100.0 * float(np.mean(predicted == job.labels)), "accuracy"
    elif job.reference is not None:
        accuracy, metric = 100.0 * float(np.mean(predicted == job.reference)), "agreement"
    else:
        accuracy, metric = 100.0, "agreement"
    latency: dict[int, dict[int, float]] = {}
    for threads in job.threads:
        timed = session(Path(job.path), threads=threads)
        latency[threads] = {
            b: _median_ms(
                timed,
                name,
                _batch_of(job.inputs, b),
                max(job.repeats // max(b // 8, 1), 10),
                job.warmup,
            )
            for b in job.batches
        }
    return VariantMeasurement(
        quantization=job.quantization,
        size=Path(job.path).stat().st_size,
        accuracy=round(accuracy, 4),
        latency_ms=latency,
        metric=metric,
    )
