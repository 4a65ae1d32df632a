"""The registry and the content-addressed store, including two processes at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fogline.cloud import ArtifactStore, Registry, load_settings, parse_model_ref
from fogline.protocol import (
    ArtifactError,
    ConfigError,
    InvalidIdError,
    RegistryError,
    TensorSpec,
    UnknownModelError,
)

SPEC_IN = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
SPEC_OUT = [TensorSpec(name="logits", dtype="float32", shape=[-1, 3])]


def register(registry: Registry, name: str, path: Path, **kw: object) -> object:
    kw.setdefault("card", {"note": "x"})
    return registry.register(
        name,
        artifacts={"fp32": path},
        assignments={"cpu-1t": "fp32"},
        inputs=SPEC_IN,
        outputs=SPEC_OUT,
        source="test",
        lineage={"recipe": "test"},
        **kw,  # type: ignore[arg-type]
    )


def test_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = os.urandom(300_000)
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.put_bytes(data) == sha  # idempotent
    assert store.read(sha) == data
    assert store.read(sha, 1000, 10) == data[1000:1010]
    assert store.read(sha, len(data) - 5, 100) == data[-5:]
    assert store.size(sha) == len(data) and store.verify(sha)
    assert list(store) == [sha]
    assert not list((tmp_path / "store").rglob(".tmp-*"))
    with pytest.raises(ArtifactError, match="outside"):
        store.read(sha, len(data), 1)
    with pytest.raises(ArtifactError, match="not in the store"):
        store.path("0" * 64)
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.path("../etc/passwd")


def test_register_get_list_and_versions(cloud_registry: Registry, tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"model-bytes")
    example = {"input": np.ones((1, 4), np.float32)}
    first = register(cloud_registry, "alpha", model, labels=["a", "b", "c"], example_input=example)
    second = register(cloud_registry, "alpha", model)
    other = register(cloud_registry, "beta", model)
    assert [first.version, second.version, other.version] == [1, 2, 1]  # type: ignore[attr-defined]
    latest = cloud_registry.get("alpha")
    assert latest.version == 2 and latest.status == "registered"
    one = cloud_registry.resolve("alpha:1")
    assert one.labels == ["a", "b", "c"] and one.assignments == {"cpu-1t": "fp32"}
    assert one.example_input is not None
    np.testing.assert_array_equal(one.example_input["input"], example["input"])
    assert one.inputs == SPEC_IN and one.card == {"note": "x"}
    assert cloud_registry.artifact_path(one, "fp32").read_bytes() == b"model-bytes"
    assert [r.ref for r in cloud_registry.list_models()] == ["alpha:1", "alpha:2", "beta:1"]
    json.dumps(one.summary())  # JSON-friendly
    published = cloud_registry.mark_published("alpha", 1)
    assert published.status == "published" and published.published_at is not None


def test_registry_refuses_bad_input(cloud_registry: Registry, tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="no model ghost"):
        cloud_registry.get("ghost")
    with pytest.raises(UnknownModelError):
        cloud_registry.resolve("ghost:0")
    with pytest.raises(InvalidIdError):
        cloud_registry.get("bad/name")
    with pytest.raises(RegistryError, match="unknown variant"):
        cloud_registry.register(
            "alpha",
            artifacts={"fp32": model},
            assignments={"cpu-1t": "int8"},
            inputs=SPEC_IN,
            outputs=SPEC_OUT,
            source="t",
            lineage={},
            card={},
        )
    with pytest.raises(ArtifactError):
        register(cloud_registry, "alpha", tmp_path / "missing.bin")
    with pytest.raises(RegistryError, match="not JSON"):
        register(cloud_registry, "alpha", model, card={"x": float("nan")})
    assert cloud_registry.list_models() == []  # nothing half-registered
    assert parse_model_ref("m:3") == ("m", 3) and parse_model_ref("m") == ("m", None)


def test_desired_sequence_is_monotonic_per_scope(cloud_registry: Registry) -> None:
    a = cloud_registry.update_desired("fleet", None, "alpha", 1)
    b = cloud_registry.update_desired("fleet", None, "beta", 4)
    g = cloud_registry.update_desired("group", "lab", "alpha", 2)
    assert b.sequence > a.sequence and b.models == {"alpha": 1, "beta": 4}
    assert g.models == {"alpha": 2}
    stored = cloud_registry.desired("fleet")
    assert stored is not None and stored.sequence == b.sequence


_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from fogline.cloud import Registry
    from fogline.protocol import TensorSpec
    data_dir, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    registry = Registry(data_dir)
    spec = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
    shared = data_dir.parent / "shared.bin"
    own = data_dir.parent / f"{tag}.bin"
    versions = []
    for i in range(count):
        own.write_bytes(f"{tag}-{i}".encode() * 1000)
        record = registry.register(
            "racer", artifacts={"fp32": shared, "int8": own}, assignments={"cpu-1t": "int8"},
            inputs=spec, outputs=spec, source="test", lineage={"tag": tag}, card={"i": i},
        )
        versions.append(record.version)
        registry.update_desired("fleet", None, "racer", record.version)
    print(json.dumps(versions))
    """
)


def test_two_processes_registering_at_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    Registry(data_dir)
    (tmp_path / "shared.bin").write_bytes(os.urandom(200_000))
    count = 15
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(data_dir), tag, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    everything = outputs[0] + outputs[1]
    assert sorted(everything) == list(range(1, 2 * count + 1))  # no duplicates, no gaps
    assert outputs[0] == sorted(outputs[0]) and outputs[1] == sorted(outputs[1])  # monotonic
    registry = Registry(data_dir)
    records = registry.list_models("racer")
    assert len(records) == 2 * count
    for record in records:
        for variant in record.variants:
            assert registry.store.verify(variant.sha256)
        tag, i = record.lineage["tag"], record.card["i"]
        path = registry.artifact_path(record, "int8")
        assert path.read_bytes() == f"{tag}-{i}".encode() * 1000
    assert len(list(registry.store)) == 2 * count + 1
    desired = registry.desired("fleet")
    assert desired is not None and desired.models["racer"] in everything


def test_settings_from_toml_env_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(
        '[cloud]\naccuracy_budget = 0.5\n[[cloud.device_classes]]\nname = "tiny"\nthreads = 2\n'
    )
    monkeypatch.setenv("FOGLINE_BROKER_URL", "mqtt://example:1884")
    settings = load_settings(config, data_dir=tmp_path)
    assert settings.accuracy_budget == 0.5 and settings.broker_url == "mqtt://example:1884"
    assert [c.name for c in settings.device_classes] == ["tiny"] and settings.data_dir == tmp_path
    config.write_text("[cloud]\naccuracy_budget = -1\n")
    with pytest.raises(ConfigError, match="accuracy_budget"):
        load_settings(config)
    config.write_text("[cloud]\nunknown_field = 1\n")
    with pytest.raises(ConfigError, match="unknown_field"):
        load_settings(config)
    config.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config)
    config.unlink()  # else <data_dir>/cloud.toml, still garbage, is what fails
    env = {
        "FOGLINE_DEVICE_CLASSES": '[{"name": "one", "threads": 3}]',
        "FOGLINE_CHUNK_SIZE": "4096",
    }
    settings = load_settings(data_dir=tmp_path, env=env)
    assert [(c.name, c.threads) for c in settings.device_classes] == [("one", 3)]
    assert settings.chunk_size == 4096
    with pytest.raises(ConfigError, match=r"\$FOGLINE_TOPIC_PREFIX: field 'topic_prefix'"):
        load_settings(data_dir=tmp_path, env={"FOGLINE_TOPIC_PREFIX": "a/+"})
    monkeypatch.setenv("FOGLINE_ACCURACY_BUDGET", "lots")
    with pytest.raises(ConfigError, match=r"\$FOGLINE_ACCURACY_BUDGET: field 'accuracy_budget'"):
        load_settings(data_dir=tmp_path)
