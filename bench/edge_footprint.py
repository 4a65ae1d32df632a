"""Agent footprint: resident memory with the model loaded, and cold start from process
start to serving, for ``fogline-edge run`` in a subprocess.

Baseline in the same run: a bare Python process that imports onnxruntime and loads the
same model (the least any ONNX Runtime server can do). The model is the onnx.helper
CNN stand-in for the reference CNN (see bench/edge_overhead.py).

A third agent variant verifies one signed release manifest in the agent's process
before the CLI starts, as a connected agent does at its first release or desired state:
``cryptography`` (and its bundled OpenSSL) loads only then, so this is the resident
memory of an agent in steady state with a broker.

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

# The agent's CLI, after one signature check (what the first signed release costs).
_VERIFIED_AGENT = """
import sys
from pathlib import Path
from fogline.protocol import SignedRelease, TrustStore, decode, verify_release
signed = decode(Path(sys.argv[1]).read_bytes(), SignedRelease)
verify_release(signed, TrustStore.from_texts([sys.argv[2]]))
from fogline.edge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _infer_ok(port: int, body: bytes) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("POST", "/v2/models/cnn/infer", body=body)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def run_agent(tmp: Path, http_on: bool, verify: list[str] | None = None) -> dict[str, float]:
    """``verify``: [signed release file, public key] to check one signature first."""
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
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    return {"ready_s": ready_s, "served_s": served_s, "rss_mb": rss}


def run_baseline(model: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _BASELINE, str(model)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        ready_s = time.perf_counter() - t0
        time.sleep(0.3)
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"ready_s": ready_s, "rss_mb": rss}


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
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        install(tmp, "cnn", data)
        model = tmp / "raw.onnx"
        model.write_bytes(data)
        kit = ReleaseKit(Topics())
        release = tmp / "release.msgpack"
        release.write_bytes(encode(kit.release("cnn", 1, data)))
        verify = [str(release), kit.public_key]
        for _ in range(args.runs):  # interleaved, so load changes hit all three alike
            rows["baseline"].append(run_baseline(model))
            rows["agent_http"].append(run_agent(tmp, True))
            rows["agent_no_http"].append(run_agent(tmp, False))
            rows["agent_http_verified"].append(run_agent(tmp, True, verify))

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[name]), 3)

    result = {
        "model": "onnx.helper CNN 1x1x8x8 -> 10 (stand-in for the reference CNN)",
        "runs": args.runs,
        "baseline_rss_mb": med("baseline", "rss_mb"),
        "agent_rss_mb": med("agent_http", "rss_mb"),
        "agent_no_http_rss_mb": med("agent_no_http", "rss_mb"),
        "agent_after_signature_check_rss_mb": med("agent_http_verified", "rss_mb"),
        "rss_ratio_vs_baseline": round(med("agent_http", "rss_mb") / med("baseline", "rss_mb"), 2),
        "target_rss_mb": TARGET_RSS_MB,
        "baseline_cold_start_s": med("baseline", "ready_s"),
        "agent_cold_start_s": med("agent_http", "ready_s"),
        "agent_first_http_infer_s": med("agent_http", "served_s"),
        "agent_no_http_cold_start_s": med("agent_no_http", "ready_s"),
        "cold_start_ratio_vs_baseline": round(
            med("agent_http", "served_s") / med("baseline", "ready_s"), 2
        ),
        "target_cold_start_s": TARGET_COLD_S,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>30}: {value}")


if __name__ == "__main__":
    main()
