"""``fogline cloud serve``: every long-running cloud service, in-process and as the CLI.

Real Mosquitto, the shared local Ray (Serve apps deleted by each test, Serve shut down at
the end of the module, Ray left up), real SQLite under ``tmp_path``, tiny real ONNX
models registered through :meth:`Registry.register`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fogline.cloud import (
    CloudSettings,
    ModelRecord,
    Registry,
    ServeConfig,
    build_manifest,
    load_signing_key,
    publish_release,
)
from fogline.cloud.cli import app
from fogline.cloud.serving import (
    CloudServices,
    OnnxRunner,
    shutdown_serving,
    start_cloud_services,
)
from fogline.protocol import (
    ConfigError,
    ErrorReply,
    Heartbeat,
    InferenceRequest,
    InferenceResponse,
    MqttSettings,
    MqttTransport,
    SigningKey,
    Tensor,
    TensorSpec,
    Topics,
    UnknownModelError,
    decode,
    encode,
    free_port,
    sign_release,
)

pytestmark = pytest.mark.ray

OUR_THREADS = ("fogline-bridge", "fogline-artifacts", "fogline-redeploy", "fleet-")
X = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, 1.0]], dtype=np.float32)


# -- helpers -------------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Liveness wait (not a timing assertion): fails only if it never happens."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def serve_apps() -> set[str]:
    from ray import serve

    try:
        return set(serve.status().applications)
    except Exception:  # Serve not running: no applications
        return set()


def our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(OUR_THREADS)]


def register(
    registry: Registry, builder: Callable[..., Path], seed: int, *, publish: bool = True
) -> ModelRecord:
    path = builder(registry.data_dir.parent / f"tiny-{seed}.onnx", seed=seed)
    record = registry.register(
        "tiny",
        artifacts={"fp32": path},
        assignments={"cpu-1t": "fp32"},
        inputs=[TensorSpec(name="input", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 3])],
        source="test",
        lineage={"seed": seed},
        card={},
    )
    return registry.mark_published("tiny", record.version) if publish else record


def reference(registry: Registry, record: ModelRecord) -> np.ndarray:
    runner = OnnxRunner(registry.artifact_path(record, "fp32"))
    return runner.run({"input": X})["logits"]


class Device:
    """A test client that asks the cloud for inference and sends heartbeats."""

    def __init__(self, settings: MqttSettings, topics: Topics, device_id: str = "dev-1") -> None:
        self.topics, self.device_id = topics, device_id
        self.transport = MqttTransport(settings)
        self.transport.connect()
        self._replies: dict[str, Any] = {}
        self._cond = threading.Condition()
        self.transport.subscribe(topics.inbox_filter(device_id), self._on_reply, qos=1)

    def _on_reply(self, msg: Any) -> None:
        try:
            reply: Any = decode(msg.payload, InferenceResponse)
        except Exception:
            reply = decode(msg.payload, ErrorReply)
        with self._cond:
            self._replies[reply.correlation_id] = reply
            self._cond.notify_all()

    def infer(self, x: np.ndarray = X, timeout_s: float = 60.0) -> Any:
        cid = uuid.uuid4().hex
        request = InferenceRequest(
            correlation_id=cid, reply_to=self.topics.inbox(self.device_id, "infer"),
            model="tiny", inputs={"input": Tensor.from_numpy(x)}, deadline=time.time() + 60,
            device_id=self.device_id,
        )
        self.transport.publish(self.topics.infer_requests("tiny"), encode(request), qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: cid in self._replies, timeout_s), "no reply"
            return self._replies.pop(cid)

    def heartbeat(self) -> None:
        beat = Heartbeat(
            device_id=self.device_id, device_class="cpu-1t", seq=1, at=time.time(),
            uptime_s=1.0, interval_s=5.0, models={"tiny": 1}, requests=7,
        )
        self.transport.publish(self.topics.heartbeat(self.device_id), encode(beat), qos=1)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture(scope="module", autouse=True)
def _serve_down_after_module(ray_session: Any) -> Iterator[None]:
    yield
    shutdown_serving()  # leave no Serve behind for other modules; Ray itself stays up


@pytest.fixture
def settings(tmp_path: Path, broker_url: str) -> CloudSettings:
    return CloudSettings(
        data_dir=tmp_path / "data",
        broker_url=broker_url,
        topic_prefix=f"serve-{uuid.uuid4().hex[:8]}/v1",  # no retained leftovers
        serve=ServeConfig(metrics_port=0, deployment={"num_cpus": 0.1}),
    )


@pytest.fixture
def cloud(
    settings: CloudSettings, mqtt_settings: MqttSettings
) -> Iterator[Callable[..., CloudServices]]:
    """Start cloud services on their own transport; everything is closed at teardown."""
    opened: list[tuple[CloudServices, MqttTransport]] = []

    def start(**kwargs: Any) -> CloudServices:
        transport = MqttTransport(mqtt_settings)
        transport.connect()
        try:
            services = start_cloud_services(settings, transport, **kwargs)
        except BaseException:
            transport.close()
            raise
        opened.append((services, transport))
        return services

    try:
        yield start
    finally:
        for services, transport in reversed(opened):
            services.close()
            transport.close()


@pytest.fixture
def device(mqtt_settings: MqttSettings, settings: CloudSettings) -> Iterator[Device]:
    dev = Device(mqtt_settings, settings.topics)
    try:
        yield dev
    finally:
        dev.close()


# -- in-process ----------------------------------------------------------------------------------
def test_serves_inference_records_heartbeats_and_closes_everything(
    cloud: Callable[..., CloudServices],
    settings: CloudSettings,
    device: Device,
    cloud_tiny_classifier: Callable[..., Path],
) -> None:
    registry = Registry(settings.data_dir)
    v1 = register(registry, cloud_tiny_classifier, seed=1)
    port = free_port()
    services = cloud(serve_models=["tiny"], metrics_port=port)
    assert services.names == [
        "ArtifactService", "Ray", "Serve", "InferenceBridge", "ReleaseFollower",
        "FleetMonitor", "FleetWebServer",
    ]
    assert services.served_versions() == {"tiny": 1}
    assert "fogline-tiny-v1" in serve_apps()

    reply = device.infer()
    assert isinstance(reply, InferenceResponse) and reply.version == 1
    np.testing.assert_allclose(reply.outputs["logits"].to_numpy(), reference(registry, v1),
                               rtol=1e-5)

    device.heartbeat()
    assert services.monitor is not None and services.fleet_store is not None
    store = services.fleet_store
    wait_until(lambda: [d.device_id for d in store.devices()] == ["dev-1"])
    recorded = store.device("dev-1")
    assert recorded.heartbeat is not None and recorded.heartbeat.models == {"tiny": 1}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=10) as resp:
        assert json.loads(resp.read())["devices_total"] == 1
    assert services.metrics_url == f"http://127.0.0.1:{port}/metrics"

    services.close()
    assert our_threads() == []
    assert not any(app.startswith("fogline-tiny") for app in serve_apps())
    with pytest.raises(OSError):  # the metrics server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    services.close()  # idempotent


def test_the_fleet_monitor_uses_postgres_when_the_fleet_settings_name_it(
    cloud: Callable[..., CloudServices], device: Device, postgres_url: str
) -> None:
    from fogline.cloud.fleet import FleetSettings, PostgresFleetStore

    fleet = FleetSettings(store_url=postgres_url)  # as FOGLINE_FLEET__STORE_URL sets it
    services = cloud(serve_models=[], fleet_settings=fleet)
    assert services.names == ["ArtifactService", "FleetMonitor"]
    store = services.fleet_store
    assert isinstance(store, PostgresFleetStore)

    def heartbeat_landed() -> bool:  # sent until the monitor's subscription is in place
        device.heartbeat()
        return [d.device_id for d in store.devices()] == ["dev-1"]

    wait_until(heartbeat_landed)
    services.close()
    with PostgresFleetStore(postgres_url, readonly=True) as again:  # it is in the database
        assert [d.device_id for d in again.devices()] == ["dev-1"]


def test_follows_new_releases_and_ignores_bad_ones(
    cloud: Callable[..., CloudServices],
    settings: CloudSettings,
    device: Device,
    cloud_tiny_classifier: Callable[..., Path],
    mqtt_settings: MqttSettings,
) -> None:
    registry = Registry(settings.data_dir)
    v1 = register(registry, cloud_tiny_classifier, seed=1)
    services = cloud(serve_models=["tiny"], fleet=False)
    assert services.follower is not None
    follower, topics = services.follower, settings.topics
    key = load_signing_key(settings.data_dir)
    manifest = build_manifest(v1)

    def release(version: int, payload: bytes) -> None:
        publisher.publish(topics.release("tiny", version), payload, qos=1, wait=True)

    publisher = MqttTransport(mqtt_settings)
    publisher.connect()
    try:
        # Refused, v1 keeps serving: garbage, a stranger's signature, a release whose
        # manifest names another version than its topic...
        release(3, b"\x00garbage")
        release(3, encode(sign_release(manifest.model_copy(update={"version": 3}),
                                       SigningKey.generate())))
        release(3, encode(sign_release(manifest.model_copy(update={"version": 4}), key)))
        wait_until(lambda: follower.rejected == 3)
        # ... a properly signed version the registry does not have ...
        release(5, encode(sign_release(manifest.model_copy(update={"version": 5}), key)))
        wait_until(lambda: follower.failed == 1)
        # ... and an old version, ignored without even a look.
        release(1, b"\x00garbage")
        reply = device.infer()
        assert isinstance(reply, InferenceResponse) and reply.version == 1
        assert services.served_versions() == {"tiny": 1} and follower.redeployed == 0

        # A real publish of v2: deployed next to v1, the bridge switches, v1 is deleted.
        v2 = register(registry, cloud_tiny_classifier, seed=2, publish=False)
        publish_release(registry, "tiny", 2, publisher, key, topics=topics)
        wait_until(lambda: services.served_versions() == {"tiny": 2})
        reply = device.infer()
        assert isinstance(reply, InferenceResponse) and reply.version == 2
        np.testing.assert_allclose(
            reply.outputs["logits"].to_numpy(), reference(registry, v2), rtol=1e-5
        )
        wait_until(lambda: "fogline-tiny-v1" not in serve_apps())  # deleted after the switch
        assert "fogline-tiny-v2" in serve_apps()
        assert (follower.redeployed, follower.rejected, follower.failed) == (1, 3, 1)
    finally:
        publisher.close()
    services.close()
    assert not any(app.startswith("fogline-tiny") for app in serve_apps())
    assert our_threads() == []


def test_pinned_version_in_a_share_group(
    cloud: Callable[..., CloudServices],
    settings: CloudSettings,
    cloud_tiny_classifier: Callable[..., Path],
) -> None:
    registry = Registry(settings.data_dir)
    register(registry, cloud_tiny_classifier, seed=1)
    register(registry, cloud_tiny_classifier, seed=2)
    services = cloud(serve_models=["tiny:1"], fleet=False, share_group="grp")
    assert services.served_versions() == {"tiny": 1}
    assert services.follower is None  # nothing to follow: the version is pinned
    assert "ReleaseFollower" not in services.names
    # A replica: shared subscriptions, and Serve apps of its own (another replica
    # stopping must not delete what this one serves).
    assert services.bridge is not None
    assert services.bridge.topic_filter.startswith("$share/grp/")
    app_name = services.deployed["tiny"].app_name
    assert app_name.startswith("fogline-tiny-v1-") and app_name in serve_apps()
    services.close()
    assert app_name not in serve_apps()


@pytest.mark.parametrize(
    ("refs", "error", "words"),
    [
        (["ghost"], UnknownModelError, "no model ghost"),
        (["tiny:9"], UnknownModelError, "no model tiny:9"),
        (["draft"], UnknownModelError, "no published version"),
        (["tiny", "tiny:1"], ConfigError, "more than once"),
    ],
)
def test_bad_models_fail_before_anything_starts(
    cloud: Callable[..., CloudServices],
    settings: CloudSettings,
    cloud_tiny_classifier: Callable[..., Path],
    refs: list[str],
    error: type[Exception],
    words: str,
) -> None:
    registry = Registry(settings.data_dir)
    register(registry, cloud_tiny_classifier, seed=1)
    path = cloud_tiny_classifier(settings.data_dir.parent / "draft.onnx")
    spec = registry.get("tiny").inputs
    registry.register(
        "draft", artifacts={"fp32": path}, assignments={}, inputs=spec, outputs=spec,
        source="test", lineage={}, card={},
    )
    apps_before = serve_apps()
    with pytest.raises(error, match=words):
        cloud(serve_models=refs)
    assert serve_apps() == apps_before and our_threads() == []


def test_bad_deployment_option_is_a_config_error_naming_it(
    cloud: Callable[..., CloudServices],
    settings: CloudSettings,
    cloud_tiny_classifier: Callable[..., Path],
) -> None:
    register(Registry(settings.data_dir), cloud_tiny_classifier, seed=1)
    settings.serve.deployment["num_replicass"] = 2
    with pytest.raises(ConfigError, match="num_replicass"):
        cloud(serve_models=["tiny"])
    assert our_threads() == []


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_unknown_serve_model_is_one_line(tmp_path: Path, broker_url: str) -> None:
    for ref, code_name in (("ghost", "unknown_model"), ("bad/name", "invalid_id")):
        result = CliRunner().invoke(app, [
            "cloud", "serve", "--serve-model", ref, "--data-dir", str(tmp_path),
            "--broker", broker_url, "--metrics-port", "0", "--json",
        ])
        assert result.exit_code == 1
        assert result.stdout.count("\n") == 1
        assert json.loads(result.stdout)["error"]["code"] == code_name
    result = CliRunner().invoke(app, [
        "cloud", "serve", "--serve-model", "ghost", "--data-dir", str(tmp_path),
        "--broker", broker_url,
    ])
    assert result.exit_code == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown_model" in lines[0] and "ghost" in lines[0]


def test_cli_serve_model_answers_and_stops_on_sigterm(
    tmp_path: Path,
    broker_url: str,
    mqtt_settings: MqttSettings,
    ray_session: Any,
    cloud_tiny_classifier: Callable[..., Path],
) -> None:
    data_dir = tmp_path / "data"
    registry = Registry(data_dir)
    register(registry, cloud_tiny_classifier, seed=1)
    prefix = f"cli-{uuid.uuid4().hex[:8]}/v1"
    (data_dir / "cloud.toml").write_text(
        f'topic_prefix = "{prefix}"\n[serve.deployment]\nnum_cpus = 0.1\n'
    )
    # The served process joins this session's Ray through RAY_ADDRESS (the cluster
    # path: it deletes its own Serve apps and disconnects, leaving Ray and Serve up).
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fogline.cloud.cli", "cloud", "serve",
            "--serve-model", "tiny", "--data-dir", str(data_dir), "--broker", broker_url,
            "--metrics-port", "0", "--json",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    device = Device(mqtt_settings, Topics(prefix), "cli-dev")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1]
        started = json.loads(line)
        assert started["event"] == "serving" and started["models"] == {"tiny": 1}
        assert "InferenceBridge" in started["services"] and "FleetMonitor" in started["services"]
        assert "fogline-tiny-v1" in serve_apps()
        reply = device.infer()
        assert isinstance(reply, InferenceResponse) and reply.version == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
        assert "Traceback" not in err
        assert "fogline-tiny-v1" not in serve_apps()
        assert ray_session.is_initialized()
    finally:
        device.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def session_processes(sid: int) -> list[str]:
    """Processes still in session ``sid`` (ps: pid, session id, command)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [row[2] for row in rows if len(row) == 3 and int(row[1]) == sid]


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [False, True], ids=["pid", "process-group"])
def test_cli_with_its_own_local_ray_leaves_nothing_behind(
    tmp_path: Path,
    broker_url: str,
    cloud_tiny_classifier: Callable[..., Path],
    whole_group: bool,
) -> None:
    """Without RAY_ADDRESS the command starts local Ray and, on SIGTERM, shuts Serve and
    Ray down: no process of its session survives. Signalling the whole process group
    (as ``timeout`` and systemd do) stops Ray's GCS at the same moment; the command
    must notice instead of waiting on it."""
    data_dir = tmp_path / "data"
    register(Registry(data_dir), cloud_tiny_classifier, seed=1)
    (data_dir / "cloud.toml").write_text("[serve.deployment]\nnum_cpus = 0.1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fogline.cloud.cli", "cloud", "serve",
            "--serve-model", "tiny", "--data-dir", str(data_dir), "--broker", broker_url,
            "--metrics-port", "0", "--no-fleet", "--json",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own session: Ray's processes are found by it
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1]
        started = json.loads(line)
        assert started["models"] == {"tiny": 1} and "Ray" in started["services"]
        assert any("raylet" in p for p in session_processes(proc.pid))
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
        wait_until(lambda: session_processes(proc.pid) == [], timeout_s=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left, even on failure


def test_config_lists_models_and_tunes_the_fleet(
    tmp_path: Path, cloud_tiny_classifier: Callable[..., Path]
) -> None:
    from fogline.cloud import load_settings
    from fogline.cloud.cli._serve import fleet_settings_for
    from fogline.cloud.serving import check_serve_models

    data_dir = tmp_path / "data"
    register(Registry(data_dir), cloud_tiny_classifier, seed=1)
    config = tmp_path / "fogline.toml"
    config.write_text(
        '[cloud.serve]\nmodels = ["tiny"]\nmetrics_port = 0\n'
        "[cloud.serve.deployment]\nnum_replicas = 2\n"
        "[fleet]\nmissed_heartbeats = 7\n"
    )
    settings = load_settings(config, data_dir=data_dir)
    assert settings.serve.models == ["tiny"] and settings.serve.metrics_port == 0
    assert [r.ref for r in check_serve_models(settings)] == ["tiny:1"]
    fleet = fleet_settings_for(settings, config)
    assert fleet.missed_heartbeats == 7 and fleet.data_dir == data_dir

    config.write_text('[cloud.serve]\nmodelz = ["tiny"]\n')
    with pytest.raises(ConfigError, match=r"serve\.modelz"):
        load_settings(config, data_dir=data_dir)
    config.write_text("[cloud.serve.deployment]\nnum_replicas = 0\n")
    with pytest.raises(ConfigError, match="num_replicas"):
        check_serve_models(load_settings(config, data_dir=data_dir), ["tiny"])
