"""The ``fogline`` CLI: --json everywhere, and bad input exits 1 with one line, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fogline.cloud import Registry
from fogline.cloud.cli import app
from fogline.protocol import (
    PublicKey,
    SignedRelease,
    TensorSpec,
    Topics,
    TrustStore,
    decode,
    free_port,
    verify_release,
)

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def register_fake(data_dir: Path, tmp_path: Path) -> None:
    blob = tmp_path / "fake.onnx"
    blob.write_bytes(b"not really onnx, but the registry does not care")
    spec = [TensorSpec(name="input", dtype="float32", shape=[-1, 4])]
    Registry(data_dir).register(
        "fake",
        artifacts={"fp32": blob},
        assignments={"cpu-1t": "fp32"},
        inputs=spec,
        outputs=spec,
        source="test",
        lineage={"recipe": "test"},
        card={"measurements": [], "gate": {}},
        example_input={"input": np.zeros((1, 4), np.float32)},
    )


def test_keys_show_is_stable_and_json(tmp_path: Path) -> None:
    code, out, _ = invoke("keys", "show", "--data-dir", str(tmp_path), "--json")
    assert code == 0
    first = json.loads(out)
    assert PublicKey.from_text(first["public_key"]).key_id == first["key_id"]
    code, out, _ = invoke("keys", "show", "--data-dir", str(tmp_path))
    assert code == 0 and first["public_key"] in out and first["key_id"] in out
    assert json.loads(invoke("keys", "show", "--data-dir", str(tmp_path), "--json")[1]) == first


def test_model_list_show_json(tmp_path: Path) -> None:
    assert json.loads(invoke("model", "list", "--data-dir", str(tmp_path), "--json")[1]) == []
    register_fake(tmp_path, tmp_path)
    listed = json.loads(invoke("model", "list", "--data-dir", str(tmp_path), "--json")[1])
    assert [(m["name"], m["version"]) for m in listed] == [("fake", 1)]
    shown = json.loads(invoke("model", "show", "fake:1", "--data-dir", str(tmp_path), "--json")[1])
    assert shown["assignments"] == {"cpu-1t": "fp32"} and shown["status"] == "registered"
    code, out, _ = invoke("model", "show", "fake", "--data-dir", str(tmp_path))
    assert code == 0 and "fake:1" in out


@pytest.mark.parametrize(
    ("args", "code_name"),
    [
        (("model", "show", "ghost"), "unknown_model"),
        (("model", "show", "ghost:x"), "unknown_model"),
        (("model", "show", "bad/name"), "invalid_id"),
        (("model", "publish", "ghost"), "unknown_model"),
        (("train", "no-such-recipe"), "config_error"),
        (("model", "publish", "fake", "--to", "planet:x"), "config_error"),
        (("model", "publish", "fake", "--to", "group:a/b"), "invalid_id"),
    ],
)
def test_bad_input_is_one_line_json_error(
    tmp_path: Path, args: tuple[str, ...], code_name: str
) -> None:
    register_fake(tmp_path, tmp_path)
    code, out, _ = invoke(
        *args,
        "--data-dir",
        str(tmp_path),
        "--json",
        *(("--broker", f"mqtt://127.0.0.1:{free_port()}") if "publish" in args else ()),
    )
    assert code == 1
    assert out.count("\n") == 1 and json.loads(out)["error"]["code"] == code_name


def test_publish_with_broker_down_is_one_line(tmp_path: Path) -> None:
    register_fake(tmp_path, tmp_path)
    url = f"mqtt://127.0.0.1:{free_port()}"
    code, out, err = invoke(
        "model", "publish", "fake", "--data-dir", str(tmp_path), "--broker", url
    )
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0 and "broker_unavailable" in err and "Traceback" not in err


def test_publish_json_and_manifest_retained(
    tmp_path: Path, broker_url: str, cloud_inbox: Callable[[], object]
) -> None:
    register_fake(tmp_path, tmp_path)
    code, out, _ = invoke(
        "model",
        "publish",
        "fake",
        "--to",
        "group:lab",
        "--data-dir",
        str(tmp_path),
        "--broker",
        broker_url,
        "--json",
    )
    assert code == 0, out
    summary = json.loads(out)
    assert summary["desired_topic"] == Topics().group_desired("lab")
    key = json.loads(invoke("keys", "show", "--data-dir", str(tmp_path), "--json")[1])["public_key"]
    inbox = cloud_inbox()
    inbox.listen(summary["release_topic"])  # type: ignore[attr-defined]
    signed = decode(inbox.get().payload, SignedRelease)  # type: ignore[attr-defined]
    manifest = verify_release(signed, TrustStore.from_texts([key]))
    assert (manifest.model, manifest.version) == ("fake", 1)


def test_import_corrupt_file_subprocess_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage" * 50)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fogline.cloud.cli",
            "model",
            "import",
            str(bad),
            "--name",
            "bad",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "invalid_model" in lines[0]


def test_cloud_serve_runs_until_sigterm(tmp_path: Path, broker_url: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fogline.cloud.cli",
            "cloud",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--broker",
            broker_url,
            "--metrics-port",
            "0",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "serving"
        assert started["services"] == ["ArtifactService", "FleetMonitor"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cloud_serve_broker_down_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    code, out, _ = invoke(
        "cloud",
        "serve",
        "--data-dir",
        str(tmp_path),
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        "--json",
    )
    assert code == 1 and json.loads(out)["error"]["code"] == "broker_unavailable"
    assert time.monotonic() - start < 60


def test_cloud_serve_dev_broker_starts_one_on_the_configured_port(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fogline.cloud.cli",
            "cloud",
            "serve",
            "--dev-broker",
            "--data-dir",
            str(tmp_path),
            "--broker",
            url,
            "--metrics-port",
            "0",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["broker"] == url
        register_fake(tmp_path, tmp_path)
        code, out, _ = invoke(
            "model", "publish", "fake", "--data-dir", str(tmp_path), "--broker", url, "--json"
        )
        assert code == 0, out
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["model", "publish"], ["$FOGLINE_DATA_DIR", "$FOGLINE_BROKER_URL", "[cloud] table"]),
        (["train"], ["[default: the recipe name]"]),
        (["cloud", "serve"], ["[default: 9464]"]),
        (["fleet", "status"], ["$FOGLINE_DATA_DIR", "[fleet] table"]),
    ],
)
def test_help_shows_the_defaults_it_writes_in_brackets(
    command: list[str], shown: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich reads "[default: ...]" as markup and drops it unless escaped."""
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    for text in shown:
        assert text in result.output
