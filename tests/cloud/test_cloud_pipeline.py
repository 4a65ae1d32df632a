"""End to end on the shared local Ray and a real Mosquitto: train digits-cnn, export,
quantize, gate, register, sign, publish; the manifest is retained and verifies; the
artifact service serves what it names. Plus ONNX import, good and bad."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fogline.cloud import (
    ArtifactService,
    Registry,
    import_model,
    load_settings,
    load_signing_key,
    publish_release,
    run_pipeline,
)
from fogline.cloud._export import check_parity, export_onnx
from fogline.cloud.training import load_recipe
from fogline.protocol import (
    ArtifactChunk,
    ChunkRequest,
    ConfigError,
    InvalidModelError,
    MqttSettings,
    MqttTransport,
    SignedDesiredState,
    SignedRelease,
    Topics,
    TrainingError,
    TrustStore,
    decode,
    encode,
    verify_desired,
    verify_release,
)


@pytest.mark.ray
@pytest.mark.slow
def test_train_register_publish_and_serve(
    ray_session: Any, tmp_path: Path, mqtt_settings: MqttSettings, cloud_inbox: Callable[[], Any]
) -> None:
    settings = load_settings(data_dir=tmp_path / "data", broker_url=mqtt_settings.url)
    result = run_pipeline("digits-cnn", epochs=1, settings=settings, progress=False, repeats=10)
    record = result.record
    assert record.ref == "digits-cnn:1" and record.source == "trained"
    assert [h["epoch"] for h in result.history] == [1.0]
    card = record.card
    measured = {m["quantization"] for m in card["measurements"]}
    assert {"fp32", "int8-static", "int8-dynamic"} <= measured
    assert set(card["gate"]) == {"cpu-1t", "cpu-4t", "mcu"}
    assert card["gate"]["mcu"]["chosen"] is None  # too weak for any variant: served from the cloud
    assert "mcu" not in record.assignments and set(record.assignments) <= {"cpu-1t", "cpu-4t"}
    assert record.assignments, "some class must get a variant"
    assert card["export"]["parity_max_abs_diff"] < 1e-3
    assert record.lineage["data_hash"] and record.lineage["config"]["epochs"] == 1
    fp32 = next(m for m in card["measurements"] if m["quantization"] == "fp32")
    assert fp32["accuracy"] > 50.0  # one epoch already learns digits

    registry = Registry(settings.data_dir)
    key = load_signing_key(settings.data_dir)
    transport = MqttTransport(mqtt_settings)
    transport.connect()
    try:
        published = publish_release(registry, "digits-cnn", None, transport, key)
        service = ArtifactService(transport, registry.store)
        service.start()
        # A late subscriber gets the signed manifest and desired state, retained.
        watcher = cloud_inbox()
        topics = Topics()
        watcher.listen(topics.release("digits-cnn", 1))
        signed = decode(watcher.get().payload, SignedRelease)
        trust = TrustStore([key.public_key])
        manifest = verify_release(signed, trust)
        assert manifest.model == "digits-cnn" and manifest.version == 1
        assert manifest.key_id == key.key_id and manifest.expires_at > manifest.created_at
        assert manifest.labels == [str(i) for i in range(10)]
        assert manifest.example_input is not None and "input" in manifest.example_input
        assert {v.device_class for v in manifest.variants} == set(record.assignments)
        assert manifest.variants[0].inputs[0].shape == [-1, 1, 8, 8]
        watcher.listen(topics.fleet_desired())
        desired = verify_desired(decode(watcher.get().payload, SignedDesiredState), trust)
        assert desired.models["digits-cnn"].version == 1
        assert desired.sequence == published.desired.desired.sequence
        assert registry.get("digits-cnn", 1).status == "published"

        # The artifact service serves the variant the manifest names, by hash.
        variant = manifest.variants[0]
        reply_to = topics.inbox("dev-" + uuid.uuid4().hex[:6], "artifacts")
        watcher.listen(reply_to)
        data = bytearray()
        while len(data) < variant.size:
            request = ChunkRequest(
                correlation_id="c",
                reply_to=reply_to,
                sha256=variant.sha256,
                offset=len(data),
                length=variant.chunk_size,
            )
            watcher.transport.publish(topics.artifact_get(variant.sha256), encode(request), qos=1)
            chunk = decode(watcher.get().payload, ArtifactChunk)
            data += chunk.data
        assert hashlib.sha256(bytes(data)).hexdigest() == variant.sha256
        service.close()
    finally:
        transport.close()


@pytest.mark.ray
def test_import_onnx_with_calibration(
    ray_session: Any, tmp_path: Path, cloud_tiny_classifier: Callable[..., Path]
) -> None:
    model = cloud_tiny_classifier(tmp_path / "tiny.onnx")
    calibration = tmp_path / "calib.npy"
    np.save(calibration, np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32))
    settings = load_settings(data_dir=tmp_path / "data")
    result = import_model(
        model, name="tiny", calibration=calibration, settings=settings, progress=False, repeats=10
    )
    record = result.record
    assert record.ref == "tiny:1" and record.source == "imported"
    fp32 = next(m for m in result.measurements if m.quantization == "fp32")
    assert fp32.metric == "agreement" and fp32.accuracy == 100.0
    assert record.inputs[0].shape == [-1, 4]
    assert record.lineage["source_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_import_refuses_corrupt_truncated_and_mismatched(
    tmp_path: Path, cloud_tiny_classifier: Callable[..., Path]
) -> None:
    good = cloud_tiny_classifier(tmp_path / "good.onnx")
    settings = load_settings(data_dir=tmp_path / "data")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not an onnx model" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.onnx"):
        with pytest.raises(InvalidModelError):
            import_model(bad, name="bad", settings=settings, progress=False)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((8, 7), np.float32))
    with pytest.raises(InvalidModelError, match="does not fit"):
        import_model(good, name="bad", calibration=wrong, settings=settings, progress=False)
    not_npy = tmp_path / "not.npy"
    not_npy.write_bytes(b"nope")
    with pytest.raises(InvalidModelError, match=r"not a \.npy"):
        import_model(good, name="bad", calibration=not_npy, settings=settings, progress=False)
    assert Registry(settings.data_dir).list_models() == []


def test_parity_failure_stops_the_release(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    different = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = export_onnx(exported, torch.zeros(2, 4), tmp_path / "m.onnx")
    inputs = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    assert check_parity(path, exported, inputs) < 1e-4
    with pytest.raises(TrainingError, match="parity check failed"):
        check_parity(path, different, inputs)


def test_recipe_entry_points_fail_cleanly() -> None:
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="cannot import"):
        load_recipe("fogline_no_such_module:recipe")
    with pytest.raises(ConfigError, match="has no function"):
        load_recipe("json:no_such_function")
    with pytest.raises(TrainingError, match="failed"):
        load_recipe("json:dumps")  # needs an argument: the recipe call fails
    with pytest.raises(TrainingError, match="not a fogline Recipe"):
        load_recipe("time:time")
    recipe = load_recipe("digits-cnn")
    assert recipe.holdout_labels is not None and len(recipe.holdout_inputs) == len(
        recipe.holdout_labels
    )
