"""The shipped deployment files against the real agent. There is no Docker or Kubernetes
here, so what a container would run is run directly: the compose setup's broker config
by a real Mosquitto, its agent config by a real ``fogline-edge run`` (installed as
Dockerfile.edge installs it) that installs a signed release and answers over HTTP; the
DaemonSet's config through the agent's own loader with the environment the DaemonSet
gives it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from _release_kit import ArtifactServer, Observer, ReleaseKit, build_model, publish, read_ready

from fogline.edge import AgentConfig, load_config
from fogline.protocol import (
    ConfigError,
    MosquittoBroker,
    MqttSettings,
    SigningKey,
    Topics,
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "edge-daemonset.yaml"
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's ``${NAME}`` and ``${NAME:-default}``."""
    return _COMPOSE_VARIABLE.sub(lambda m: variables.get(m[1]) or m[2] or "", text)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def _edge_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    edges = {
        name: s
        for name, s in services.items()
        if isinstance(s.get("build"), dict) and s["build"]["dockerfile"].endswith("Dockerfile.edge")
    }
    assert len(edges) >= 2
    return edges


def _service_env(service: Mapping[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    return {k: _interpolate(str(v), variables) for k, v in service["environment"].items()}


def _mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> source, of the service's volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def _edge_entrypoint_config() -> str:
    """The ``--config`` path in Dockerfile.edge's ENTRYPOINT."""
    text = (DOCKER / "Dockerfile.edge").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])  # type: ignore[index]
    return str(entry[entry.index("--config") + 1])


def _public_key() -> str:
    return SigningKey.generate().public_key.to_text()


def test_every_file_the_compose_setup_and_its_images_use_is_in_the_repository() -> None:
    for name, service in _compose()["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name
        for source in _mounts(service).values():
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is missing"
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"


def test_each_compose_edge_gets_a_valid_config_of_its_own() -> None:
    key = _public_key()
    entry_config = _edge_entrypoint_config()
    ids = set()
    for name, service in _edge_services().items():
        env = _service_env(service, {"FOGLINE_CLOUD_KEY": key})
        mounts = _mounts(service)
        assert mounts[entry_config] == "./agent.toml", name
        config = load_config(DOCKER / "agent.toml", env=env)
        ids.add(config.device_id)
        assert config.mqtt.url == "mqtt://broker:1883"
        assert config.trusted_keys == [key]
        assert str(config.data_dir) in mounts, f"{name}: data_dir is not on a volume"
        assert config.http.host == "0.0.0.0"  # reachable through the published port
        assert any(p.endswith(f":{config.http.port}") for p in service["ports"]), name
    assert len(ids) == len(_edge_services())


def test_a_compose_edge_without_the_cloud_key_fails_with_a_config_error() -> None:
    service = next(iter(_edge_services().values()))
    env = _service_env(service, {})  # FOGLINE_CLOUD_KEY not set in .env
    with pytest.raises(ConfigError, match="trusted_keys"):
        load_config(DOCKER / "agent.toml", env=env)


def _compose_broker_lines(tmp_path: Path, port: int) -> list[str]:
    """deploy/docker/broker.conf with its container path and port moved into tmp."""
    data = tmp_path / "broker-data"
    data.mkdir()
    lines = []
    for line in (DOCKER / "broker.conf").read_text().splitlines():
        if line.startswith("#") or line.startswith("log_dest") or not line.strip():
            continue  # comments; and the test broker logs to its own file
        line = line.replace("/mosquitto/data/", f"{data}/")
        if line == "listener 1883":
            line = f"listener {port} 127.0.0.1"
        lines.append(line)
    assert f"listener {port} 127.0.0.1" in lines
    assert not any("/mosquitto/" in line for line in lines), "a container path was not moved"
    return lines


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def edge_image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with what Dockerfile.edge installs: wheels of ./shared and ./edge and
    their dependencies, nothing of the development environment."""
    root = tmp_path_factory.mktemp("edge-image")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(ROOT / "shared"),
            str(ROOT / "edge"),
        ],
        check=True,
    )
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--quiet",
            "install",
            "-c",
            str(ROOT / "constraints-dev.txt"),
            *map(str, sorted(wheels.glob("*.whl"))),
        ],
        check=True,
    )
    return python


def test_the_edge_image_install_holds_the_agent_and_nothing_of_the_cloud(
    edge_image_python: Path,
) -> None:
    probe = (
        "import importlib.util as u, fogline.edge;"
        "print([m for m in ('ray', 'torch', 'cryptography', 'fogline.cloud') if u.find_spec(m)])"
    )
    out = subprocess.run([str(edge_image_python), "-c", probe], check=True, capture_output=True)
    assert out.stdout.decode().strip() == "[]"


def test_an_agent_run_from_the_compose_config_installs_a_release_and_serves_it(
    private_mosquitto: Callable[..., MosquittoBroker],
    processes: list[subprocess.Popen[bytes]],
    edge_image_python: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    broker = private_mosquitto(_compose_broker_lines(tmp_path, port), port=port)
    settings = MqttSettings(url=broker.url)
    topics = Topics()  # the shipped config keeps the default prefix
    kit = ReleaseKit(topics)
    name, service = next(iter(_edge_services().items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOGLINE_")}
    env |= _service_env(service, {"FOGLINE_CLOUD_KEY": kit.public_key})
    device = env["FOGLINE_DEVICE_ID"]
    # Where the container has the broker's name, its volume and port 8000: this host's.
    env |= {
        "FOGLINE_MQTT__URL": broker.url,
        "FOGLINE_DATA_DIR": str(tmp_path / name),
        "FOGLINE_HTTP__PORT": "0",
    }
    config: AgentConfig = load_config(DOCKER / "agent.toml", env=env)
    exe = edge_image_python.with_name("fogline-edge")  # the container's agent, not ours
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(DOCKER / "agent.toml"), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "agent.log").open("ab"),
        start_new_session=True,
    )
    processes.append(proc)
    observer = Observer(settings, topics, device).start()
    server = ArtifactServer(settings, topics).start()
    try:
        url = str(read_ready(proc)["http_url"])
        assert _get(f"{url}/v2/health/ready")[0] == 503  # nothing installed yet
        model = build_model(seed=3)
        server.add(model)
        release = kit.release("digits", 1, model, device_class=config.device_class)
        publish(server._transport, topics.release("digits", 1), release)
        publish(
            server._transport,
            topics.fleet_desired(),
            kit.desired("fleet", {"digits": 1}, sequence=1),
        )
        observer.wait_event(kind="install_succeeded", model="digits", version=1, timeout=30)
        deadline = time.monotonic() + 10
        while _get(f"{url}/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"{url}/v2/models/digits/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.loads(reply.read())
        assert answer["outputs"][0]["shape"] == [1, 10]
        assert answer["model_version"] == "1"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        observer.wait_for(lambda: [s for s in observer.states() if s.status == "offline"])
    finally:
        server.close()
        observer.close()


def _daemonset() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    return kinds["DaemonSet"], kinds["ConfigMap"]


def test_the_daemonset_config_loads_as_each_node_would_get_it(tmp_path: Path) -> None:
    daemonset, configmap = _daemonset()
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts["config"]["mountPath"] == _edge_entrypoint_config()
    text = configmap["data"][mounts["config"]["subPath"]]
    env = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = "edge-node-7"
        elif "secretKeyRef" in source:
            env[var["name"]] = "secret-from-the-cluster"
        else:
            env[var["name"]] = var["value"]
    toml = tmp_path / "agent.toml"
    toml.write_text(text)  # as shipped: the key still to be pasted
    with pytest.raises(ConfigError, match="trusted_keys"):
        load_config(toml, env=env)
    key = _public_key()
    toml.write_text(re.sub(r"trusted_keys = \[.*\]", f'trusted_keys = ["{key}"]', text))
    config = load_config(toml, env=env)
    assert config.device_id == "edge-node-7" and config.mqtt.username == "edge-node-7"
    assert config.mqtt.password is not None and config.mqtt.uses_tls
    assert config.mqtt.tls_ca is not None
    assert str(config.mqtt.tls_ca).startswith(mounts["broker-ca"]["mountPath"] + "/")
    assert str(config.data_dir) == mounts["data"]["mountPath"]
    assert config.http.host == "0.0.0.0"  # the kubelet's probes come from outside
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == config.http.port


def test_the_systemd_unit_runs_the_agent_on_its_one_writable_directory(tmp_path: Path) -> None:
    unit: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / "fogline-edge.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            unit.setdefault(key, []).append(value)
    program, *args = unit["ExecStart"][0].split()
    assert Path(program).name == "fogline-edge" and args[:2] == ["run", "--config"]
    env = dict(v.split("=", 1) for v in unit["Environment"])
    writable = unit["ReadWritePaths"][0]
    assert unit["StateDirectory"] == [Path(writable).name] and unit["WorkingDirectory"] == [
        writable
    ]
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "dev-7"\ndata_dir = "/elsewhere"\ntrusted_keys = ["{_public_key()}"]\n'
    )
    assert str(load_config(toml, env=env).data_dir) == writable  # the unit's value wins
