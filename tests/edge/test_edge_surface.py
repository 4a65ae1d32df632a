"""The public surface of fogline.edge, its import boundary, and clean shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _release_kit import ArtifactServer, ReleaseKit, build_model, publish, sample_input

import fogline.edge
from fogline.edge import Agent, load_config
from fogline.edge._runtime import load_model
from fogline.protocol import InferenceInputError, InvalidModelError, TensorSpec


def test_public_surface_is_pinned() -> None:
    assert sorted(fogline.edge.__all__) == [
        "Admission",
        "Agent",
        "AgentConfig",
        "AgentStatus",
        "BreakerSnapshot",
        "CapacityConfig",
        "CapacitySnapshot",
        "CircuitBreaker",
        "CloudClient",
        "CloudClientStats",
        "CloudState",
        "DeliveryConfig",
        "HttpConfig",
        "InferenceResult",
        "InstalledModel",
        "LoadHints",
        "LoadedModel",
        "LocalState",
        "ModelSlot",
        "ModelStatus",
        "ModelStore",
        "PROBE_INPUT",
        "RouteDecision",
        "RoutedResult",
        "Router",
        "RoutingConfig",
        "RoutingPolicy",
        "RoutingSettings",
        "RoutingStats",
        "SessionCache",
        "decide",
        "load_config",
    ]
    assert fogline.edge.RoutingConfig is fogline.edge.RoutingSettings  # one model
    for name in ("start", "stop", "infer", "status", "wait_for_version", "set_load_hints"):
        assert callable(getattr(Agent, name))
    assert isinstance(Agent.http_url, property)


def test_importing_the_edge_pulls_no_ray_torch_cloud_or_http_stack() -> None:
    code = (
        "import sys, fogline.edge, fogline.edge.cli\n"
        "banned = ('ray', 'torch', 'fogline.cloud', 'starlette', 'uvicorn')\n"
        "bad = [m for m in banned if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_heartbeat_figures_load_no_psutil_subprocess_or_numpy_ma() -> None:
    # Each costs the device 1-2 MB resident, for figures the kernel and a sort give.
    code = (
        "import sys\n"
        "from fogline.edge._capacity import Admission\n"
        "from fogline.edge._status import ProcessUsage\n"
        "from fogline.edge.cli import _limit_malloc_arenas\n"
        "a = Admission(1, 0, 10.0)\n"
        "a.acquire(None); a.release('m', 1.0, 1.0, True)\n"
        "assert a.snapshot().latency_p99_ms == 1.0\n"
        "cpu, mem = ProcessUsage().sample()\n"
        "assert cpu >= 0 and mem > 0\n"
        "print(_limit_malloc_arenas(), sys.platform)\n"
        "print([m for m in ('psutil', 'subprocess', 'numpy.ma') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    capped, loaded = out.stdout.strip().splitlines()
    assert loaded == "[]"
    assert capped == "True linux" or not capped.endswith("linux")


def test_stop_joins_every_thread(
    kit: ReleaseKit, artifact_server: ArtifactServer, agent_factory: Callable[..., Agent]
) -> None:
    before = set(threading.enumerate())
    agent = agent_factory(http={"enabled": True, "port": 0})
    data = build_model(seed=1)
    artifact_server.add(data)
    publish(
        artifact_server._transport, kit.topics.release("digits", 1), kit.release("digits", 1, data)
    )
    assert agent.wait_for_version("digits", 1, timeout=20)
    agent.infer("digits", {"input": sample_input()})
    agent.stop()
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left
    agent.stop()  # idempotent


def test_manifest_stricter_than_the_model_is_enforced(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(build_model(seed=1))
    fixed = [TensorSpec(name="input", dtype="float32", shape=[1, 1, 8, 8])]
    model = load_model("digits", 1, "0" * 64, path, threads=1, inputs=fixed)
    from fogline.edge._runtime import run_model

    assert run_model(model, {"input": sample_input()})["logits"].shape == (1, 10)
    with pytest.raises(InferenceInputError, match="shape"):
        run_model(model, {"input": sample_input(batch=2)})
    wrong = [TensorSpec(name="image", dtype="float32", shape=[-1, 1, 8, 8])]
    with pytest.raises(InvalidModelError, match="names"):
        load_model("digits", 1, "0" * 64, path, threads=1, inputs=wrong)
    path.write_bytes(b"not an onnx file")
    with pytest.raises(InvalidModelError):
        load_model("digits", 1, "1" * 64, path, threads=1)


def test_load_hints_and_status(tmp_path: Path) -> None:
    agent = Agent(
        load_config(env={}, device_id="hints", data_dir=str(tmp_path), http={"enabled": False})
    )
    agent.set_load_hints(cpu_load=0.5, battery=0.9)
    agent.set_load_hints(thermal=0.1)
    assert agent.load_hints == {"cpu_load": 0.5, "battery": 0.9, "thermal": 0.1}
    status = agent.status()
    assert status.device_id == "hints" and status.models == {} and not status.connected
    assert status.load_hints["thermal"] == 0.1
    assert np.isfinite(status.latency_p99_ms)
