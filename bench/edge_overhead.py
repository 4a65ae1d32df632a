"""Agent.infer overhead over raw onnxruntime, and the HTTP v2 path's overhead.

Same model, same input, batch 1, same thread budget; the raw call and Agent.infer are
interleaved in one run (alternating which goes first) and the median ratio printed.
The model is a small CNN built with onnx.helper (Conv 3x3 x8 -> ReLU -> Gemm 512x10 on
1x1x8x8, ~20 us per run here), standing in for the cloud tier's reference CNN.

    .venv/bin/python bench/edge_overhead.py [--n 20000] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "edge"))
from _release_kit import build_model, sample_input

from fogline.edge import Agent, InstalledModel, ModelStore, load_config
from fogline.protocol import free_port


def install(data_dir: Path, name: str, data: bytes) -> None:
    """Put a model in the agent's store as if it had been delivered."""
    import hashlib

    store = ModelStore(data_dir)
    sha = hashlib.sha256(data).hexdigest()
    src = data_dir / "incoming.onnx"
    src.write_bytes(data)
    path = store.place(name, 1, sha, src, move=True)
    store.commit(InstalledModel(model=name, version=1, sha256=sha, file=path.name))


def raw_session(data: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--http-n", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    data = build_model(seed=0)
    x = sample_input()
    with tempfile.TemporaryDirectory() as tmp:
        install(Path(tmp), "cnn", data)
        config = load_config(
            env={},
            device_id="bench",
            data_dir=tmp,
            mqtt={"url": f"mqtt://127.0.0.1:{free_port()}"},  # no broker: serving needs none
            http={"enabled": True, "port": 0},
            capacity={"intra_op_threads": 1, "max_in_flight": 4},
            heartbeat_interval_s=3600,
        )
        agent = Agent(config)
        agent.start()
        try:
            session = raw_session(data, 1)
            feed = {"input": x}
            for _ in range(2000):  # warm both
                session.run(None, feed)
                agent.infer("cnn", feed)
            raw_t: list[float] = []
            agent_t: list[float] = []
            clock = time.perf_counter
            for i in range(args.n):
                if i % 2:
                    t0 = clock()
                    session.run(None, feed)
                    t1 = clock()
                    agent.infer("cnn", feed)
                    t2 = clock()
                else:
                    t0 = clock()
                    agent.infer("cnn", feed)
                    t1 = clock()
                    session.run(None, feed)
                    t2 = clock()
                    t0, t1, t2 = t1, t2, t2 + (t1 - t0)  # normalise: raw = t1-t0, agent = t2-t1
                raw_t.append(t1 - t0)
                agent_t.append(t2 - t1)
            raw_med = statistics.median(raw_t) * 1e6
            agent_med = statistics.median(agent_t) * 1e6

            assert agent.http_url is not None
            url = urlsplit(agent.http_url)
            conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
            conn.connect()
            # http.client writes headers and body separately: without NODELAY, Nagle plus
            # the server's delayed ACK add ~40 ms to every request (a client artefact).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 1, 8, 8],
                            "datatype": "FP32",
                            "data": x.ravel().tolist(),
                        }
                    ]
                }
            ).encode()
            http_t: list[float] = []
            for i in range(args.http_n + 100):
                t0 = clock()
                conn.request(
                    "POST",
                    "/v2/models/cnn/infer",
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                resp.read()
                if i >= 100:
                    http_t.append(clock() - t0)
                assert resp.status == 200
            conn.close()
            http_p50, http_p99 = (float(v) * 1e6 for v in np.percentile(http_t, [50, 99]))
        finally:
            agent.stop()

    result = {
        "model": "onnx.helper CNN 1x1x8x8 -> 10 (stand-in for the reference CNN)",
        "batch": 1,
        "n": args.n,
        "raw_median_us": round(raw_med, 2),
        "agent_median_us": round(agent_med, 2),
        "median_ratio": round(agent_med / raw_med, 3),
        "target_ratio": 1.10,
        "http_p50_us": round(http_p50, 1),
        "http_p99_us": round(http_p99, 1),
        "http_p50_overhead_us": round(http_p50 - raw_med, 1),
        "http_p99_overhead_us": round(http_p99 - raw_med, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
