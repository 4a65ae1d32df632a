"""The cloud's ONNX runner and serving settings (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fogline.cloud.serving import OnnxRunner, ServingSettings, parse_serving_settings
from fogline.protocol import ConfigError, FoglineError, InferenceInputError, InvalidModelError


def test_run_matches_the_reference(tiny: Any) -> None:
    runner = OnnxRunner(tiny.onnx)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    out = runner.run({"x": x})
    np.testing.assert_allclose(out["probs"], tiny.reference(x), rtol=1e-5)
    assert runner.inputs[0].batch_dynamic


def test_run_batch_merges_and_splits_and_isolates_bad_requests(tiny: Any) -> None:
    runner = OnnxRunner(tiny.onnx)
    rng = np.random.default_rng(1)
    good = [{"x": rng.normal(size=(n, 4)).astype(np.float32)} for n in (1, 3, 2)]
    bad: list[dict[str, Any]] = [
        {"x": np.zeros((1, 5), dtype=np.float32)},  # wrong shape
        {"x": np.zeros((1, 4), dtype=np.float64)},  # wrong dtype
        {"y": np.zeros((1, 4), dtype=np.float32)},  # wrong name
        {"x": np.zeros((0, 4), dtype=np.float32)},  # empty
    ]
    outcomes = runner.run_batch([good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]])
    for index, request in zip((0, 2, 5), good, strict=True):
        result = outcomes[index]
        assert isinstance(result, dict)
        np.testing.assert_allclose(result["probs"], tiny.reference(request["x"]), rtol=1e-5)
    for index in (1, 3, 4, 6):
        assert isinstance(outcomes[index], InferenceInputError)


def test_bad_model_bytes_and_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError):
        OnnxRunner(b"not an onnx model")
    with pytest.raises(InvalidModelError):
        OnnxRunner(tmp_path / "missing.onnx")


def test_run_rejects_bad_inputs_with_typed_errors(tiny: Any) -> None:
    runner = OnnxRunner(tiny.onnx)
    with pytest.raises(InferenceInputError, match="shape"):
        runner.run({"x": np.zeros((2, 3), dtype=np.float32)})
    with pytest.raises(FoglineError):
        runner.run({"x": [[1.0, 2.0, 3.0, 4.0]]})  # type: ignore[dict-item]


def test_serving_settings() -> None:
    s = ServingSettings(model="digits", version=3)
    assert s.deployment_options()["num_replicas"] == 1
    auto = parse_serving_settings(
        {"model": "digits", "version": 3, "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    )
    assert auto.deployment_options()["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in auto.deployment_options()
    for bad in (
        {"model": "digits", "version": 0},
        {"model": "a/b", "version": 1},
        {"model": "m", "version": 1, "num_replicas": 2, "autoscaling": {}},
        {"model": "m", "version": 1, "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
        {"model": "m", "version": 1, "replicas": 2},
        {"model": "m", "version": 1, "max_batch_size": 32, "max_ongoing_requests": 8},
    ):
        with pytest.raises(ConfigError, match="serving config field"):
            parse_serving_settings(bad)
