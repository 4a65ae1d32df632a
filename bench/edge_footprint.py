"""Agent footprint: resident memory with the model loaded, and cold start from process
start to serving, for ``fogline-edge run`` in a subprocess.

Baseline in the same run: a bare Python process that imports onnxruntime and loads the
same model (the least any ONNX Runtime server can do). The model is the onnx.helper
CNN stand-in for the reference CNN (see bench/edge_overhead.py).

A third agent variant verifies one signed release manifest in the agent's process
before the CLI starts, as a connected agent does at its first release or desired state:
the ed25519 backend (PyNaCl, else cryptography) loads only then, so this is the resident
memory of an agent in steady state with a broker. Another makes the same check with
``cryptography`` (PyNaCl hidden): what the fallback backend costs.

The library floor is the baseline plus the third-party libraries the agent is built on,
each doing the least the agent does with it (pydantic: one strict model built and used;
paho-mqtt: one client; msgpack: one round trip; PyNaCl: one signature checked), then
the stdlib modules it needs (sqlite3 for the outbox, http.server for the v2 API), and
no Fogline code: no agent on this stack can use less. The process also reports RSS
after each step (imported in that order, so a module two libraries share counts for the
first), which is where the floor's memory goes.

Every process runs as an installed agent does, with compiled ``.pyc`` files: the
development environment sets PYTHONDONTWRITEBYTECODE and installs Fogline editable, so
without this each start would compile Fogline's sources again. The caches go to a
temporary PYTHONPYCACHEPREFIX, filled by unmeasured starts. One more agent variant
runs without them (compiling at every start, as the development checkout does) to
show what that costs.

RSS is split into anonymous memory (the process's own: heaps, Python objects, thread
stacks) and file-backed pages (shared library code, including pages of numpy's and
onnxruntime's libraries that the kernel maps around the ones touched). The file-backed
part depends on the library versions installed (printed) and on the page cache, so
compare with the baseline of the same run.

    .venv/bin/python bench/edge_footprint.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "edge"))
from _release_kit import ReleaseKit, build_model, sample_input, to_toml
from edge_overhead import install

from fogline.protocol import Topics, encode, free_port

TARGET_RSS_MB = 80.0
TARGET_COLD_S = 1.0

_BASELINE = """
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
s.run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})
print("ready", flush=True)
time.sleep(60)
"""

# Baseline + the agent's libraries doing their minimum, no Fogline code (see the docstring).
_FLOOR = """
import json, sys, time
from pathlib import Path
def resident():  # the fields of resident() below, read in-process
    f = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
    kb = {k: int(f[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    return [kb["VmRSS"] / 1024, kb["RssAnon"] / 1024, (kb["RssFile"] + kb["RssShmem"]) / 1024]
steps = []
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
s.run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})
steps.append(["baseline", *resident()])
from pydantic import BaseModel, ConfigDict
class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    x: int
Probe.model_validate({"x": 1}).model_dump()
steps.append(["pydantic", *resident()])
import paho.mqtt.client as mqtt
mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="floor")
steps.append(["paho-mqtt", *resident()])
import msgpack
msgpack.unpackb(msgpack.packb({"x": 1}))
steps.append(["msgpack", *resident()])
import nacl.signing
key = nacl.signing.SigningKey(bytes(32))
key.verify_key.verify(key.sign(b"release"))
steps.append(["pynacl", *resident()])
import http.server, sqlite3
db = sqlite3.connect(":memory:"); db.execute("create table t (x)"); db.close()
steps.append(["sqlite3 + http.server", *resident()])
print(json.dumps({"steps": steps}), flush=True)
time.sleep(60)
"""

# The agent's CLI, after one signature check (what the first signed release costs).
_VERIFIED_AGENT = """
import sys
from pathlib import Path
if sys.argv[3] == "cryptography":
    sys.modules["nacl"] = None  # PyNaCl missing: the fallback backend
from fogline.protocol import SignedRelease, TrustStore, decode, verify_release
signed = decode(Path(sys.argv[1]).read_bytes(), SignedRelease)
verify_release(signed, TrustStore.from_texts([sys.argv[2]]))
from fogline.edge.cli import main
sys.exit(main(sys.argv[4:]))
"""


def subprocess_env(pycache: Path | None) -> dict[str, str]:
    """The environment of a measured process: with ``pycache``, compiled sources are
    written there and read back at the next start; without, nothing is written and
    Fogline's sources are compiled at every start (the development checkout)."""
    env = dict(os.environ)
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def resident(pid: int) -> tuple[float, float, float]:
    """(RSS, anonymous, file-backed) in MB, from /proc (psutil where there is none)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        kb = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        return kb["VmRSS"] / 1024, kb["RssAnon"] / 1024, (kb["RssFile"] + kb["RssShmem"]) / 1024
    except (OSError, KeyError, ValueError):
        rss = psutil.Process(pid).memory_info().rss / 2**20
        return rss, float("nan"), float("nan")


def _infer_ok(port: int, body: bytes) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("POST", "/v2/models/cnn/infer", body=body)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def run_agent(
    tmp: Path, http_on: bool, pycache: Path | None, verify: list[str] | None = None
) -> dict[str, float]:
    """``verify``: [signed release file, public key, backend] to check one signature
    first, with backend "pynacl" (what an agent uses) or "cryptography" (the fallback)."""
    port = free_port()
    config = {
        "device_id": "footprint",
        "data_dir": str(tmp),
        "heartbeat_interval_s": 3600.0,
        "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},  # no broker: serving needs none
        "http": {"enabled": http_on, "port": port},
    }
    path = tmp / "agent.toml"
    path.write_text(to_toml(config))
    exe = Path(sys.executable).with_name("fogline-edge")
    command = [str(exe), "run", "--config", str(path), "--json"]
    if verify is not None:
        command = [sys.executable, "-c", _VERIFIED_AGENT, *verify, *command[1:]]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": sample_input().ravel().tolist(),
                }
            ]
        }
    ).encode()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=subprocess_env(pycache),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready_s = time.perf_counter() - t0
        assert json.loads(line)["models"] == {"cnn": 1}, line
        served_s = ready_s
        if http_on:
            while not _infer_ok(port, body):
                time.sleep(0.002)
            served_s = time.perf_counter() - t0
            for _ in range(200):
                _infer_ok(port, body)
        time.sleep(0.3)
        rss, anon, file = resident(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    return {
        "ready_s": ready_s,
        "served_s": served_s,
        "rss_mb": rss,
        "anon_mb": anon,
        "file_mb": file,
    }


def run_baseline(model: Path, pycache: Path, code: str = _BASELINE) -> dict[str, float]:
    """The baseline process, or with ``code=_FLOOR`` the library floor (whose RSS after
    each step is returned too, as ``step:<name>`` keys)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(model)],
        stdout=subprocess.PIPE,
        env=subprocess_env(pycache),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready_s = time.perf_counter() - t0
        time.sleep(0.3)
        rss, anon, file = resident(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    row = {"ready_s": ready_s, "rss_mb": rss, "anon_mb": anon, "file_mb": file}
    if code == _FLOOR:
        for name, step_rss, step_anon, step_file in json.loads(line)["steps"]:
            row[f"step:{name}"] = step_rss
            row[f"step_anon:{name}"] = step_anon
            row[f"step_file:{name}"] = step_file
    return row


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": sys.version.split()[0]}
    for dist in ("numpy", "onnxruntime", "pydantic", "paho-mqtt", "pynacl", "cryptography"):
        try:
            found[dist] = version(dist)
        except Exception:
            found[dist] = "-"
    return found


def verify_backend() -> str:
    """The ed25519 backend an agent process checks signatures with (asked in a fresh
    process: this one has cryptography loaded by the release kit's signer)."""
    code = "from fogline.protocol import _signing; print(_signing._verify_backend()[0])"
    return subprocess.check_output([sys.executable, "-c", code], text=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = build_model(seed=0)
    rows: dict[str, list[dict[str, float]]] = {
        "baseline": [],
        "agent_http": [],
        "agent_no_http": [],
        "agent_http_verified": [],
        "agent_http_no_pyc": [],
        "agent_http_verified_cryptography": [],
        "library_floor": [],
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        install(tmp, "cnn", data)
        model = tmp / "raw.onnx"
        model.write_bytes(data)
        kit = ReleaseKit(Topics())
        release = tmp / "release.msgpack"
        release.write_bytes(encode(kit.release("cnn", 1, data)))
        verify = [str(release), kit.public_key, "pynacl"]
        verify_fallback = [str(release), kit.public_key, "cryptography"]
        pycache = tmp / "pycache"
        # Unmeasured: fill the .pyc cache, as an install does.
        run_baseline(model, pycache)
        run_baseline(model, pycache, _FLOOR)
        run_agent(tmp, True, pycache, verify)
        run_agent(tmp, True, pycache, verify_fallback)
        for _ in range(args.runs):  # interleaved, so load changes hit all variants alike
            rows["baseline"].append(run_baseline(model, pycache))
            rows["agent_http"].append(run_agent(tmp, True, pycache))
            rows["agent_no_http"].append(run_agent(tmp, False, pycache))
            rows["agent_http_verified"].append(run_agent(tmp, True, pycache, verify))
            rows["agent_http_no_pyc"].append(run_agent(tmp, True, None))
            rows["agent_http_verified_cryptography"].append(
                run_agent(tmp, True, pycache, verify_fallback)
            )
            rows["library_floor"].append(run_baseline(model, pycache, _FLOOR))

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[name]), 3)

    def floor_steps() -> dict[str, list[float]]:
        """Median RSS after each step of the floor process, and what the step added:
        [RSS, +RSS, +anon, +file-backed] in MB."""
        names = [k.split(":", 1)[1] for k in rows["library_floor"][0] if k.startswith("step:")]
        out: dict[str, list[float]] = {}
        last: tuple[float, float, float] | None = None
        for name in names:
            now = (
                med("library_floor", f"step:{name}"),
                med("library_floor", f"step_anon:{name}"),
                med("library_floor", f"step_file:{name}"),
            )
            added = [round(a - b, 1) for a, b in zip(now, last, strict=True)] if last else [0.0] * 3
            out[name] = [round(now[0], 1), *added]
            last = now
        return out

    result: dict[str, object] = {
        "model": "onnx.helper CNN 1x1x8x8 -> 10 (stand-in for the reference CNN)",
        "runs": args.runs,
        "versions": versions(),
        "verify_backend": verify_backend(),
        "baseline_rss_mb": med("baseline", "rss_mb"),
        "agent_rss_mb": med("agent_http", "rss_mb"),
        "agent_no_http_rss_mb": med("agent_no_http", "rss_mb"),
        "agent_after_signature_check_rss_mb": med("agent_http_verified", "rss_mb"),
        "agent_after_check_with_cryptography_rss_mb": med(
            "agent_http_verified_cryptography", "rss_mb"
        ),
        "agent_compiling_at_start_rss_mb": med("agent_http_no_pyc", "rss_mb"),
        "rss_ratio_vs_baseline": round(med("agent_http", "rss_mb") / med("baseline", "rss_mb"), 2),
        "agent_after_signature_check_over_baseline_mb": round(
            med("agent_http_verified", "rss_mb") - med("baseline", "rss_mb"), 1
        ),
        "target_rss_mb": TARGET_RSS_MB,
        "library_floor_rss_mb": med("library_floor", "rss_mb"),
        "library_floor_anon_mb": med("library_floor", "anon_mb"),
        "library_floor_file_mb": med("library_floor", "file_mb"),
        "library_floor_steps_mb": floor_steps(),
        "agent_after_signature_check_over_floor_mb": round(
            med("agent_http_verified", "rss_mb") - med("library_floor", "rss_mb"), 1
        ),
        "baseline_anon_mb": med("baseline", "anon_mb"),
        "baseline_file_mb": med("baseline", "file_mb"),
        "agent_after_signature_check_anon_mb": med("agent_http_verified", "anon_mb"),
        "agent_after_signature_check_file_mb": med("agent_http_verified", "file_mb"),
        "baseline_cold_start_s": med("baseline", "ready_s"),
        "agent_cold_start_s": med("agent_http", "ready_s"),
        "agent_first_http_infer_s": med("agent_http", "served_s"),
        "agent_no_http_cold_start_s": med("agent_no_http", "ready_s"),
        "agent_compiling_at_start_cold_start_s": med("agent_http_no_pyc", "ready_s"),
        "cold_start_ratio_vs_baseline": round(
            med("agent_http", "served_s") / med("baseline", "ready_s"), 2
        ),
        "target_cold_start_s": TARGET_COLD_S,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>45}: {value}")


if __name__ == "__main__":
    main()
