"""The Open Inference Protocol (v2) HTTP API: tritonclient works unchanged, and every
bad request gets its 4xx without disturbing the agent."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import tritonclient.http as triton
from _release_kit import ArtifactServer, ReleaseKit, build_model, publish, sample_input
from tritonclient.utils import InferenceServerException

from fogline.edge import Agent

HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0, "max_body_bytes": 64 * 1024}


@pytest.fixture
def served(
    kit: ReleaseKit, artifact_server: ArtifactServer, agent_factory: Callable[..., Agent]
) -> Iterator[Agent]:
    agent = agent_factory(http=HTTP, capacity={"max_in_flight": 1, "max_queue": 0})
    data = build_model(seed=1)
    artifact_server.add(data)
    publish(
        artifact_server._transport, kit.topics.release("digits", 1), kit.release("digits", 1, data)
    )
    assert agent.wait_for_version("digits", 1, timeout=20)
    yield agent


def _request(
    agent: Agent,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    assert agent.http_url is not None
    url = urlsplit(agent.http_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        doc = (
            json.loads(raw)
            if resp.getheader("content-type", "").startswith("application/json")
            else raw
        )
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
    finally:
        conn.close()


def _infer_body(**override: Any) -> bytes:
    item = {
        "name": "input",
        "shape": [1, 1, 8, 8],
        "datatype": "FP32",
        "data": sample_input().ravel().tolist(),
    }
    item.update(override)
    return json.dumps({"inputs": [item]}).encode()


def test_tritonclient_works_unchanged(served: Agent) -> None:
    assert served.http_url is not None
    client = triton.InferenceServerClient(url=served.http_url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["name"] == "digits" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        x = sample_input(batch=2)
        expected = served.infer("digits", {"input": x}).outputs["logits"]
        for binary in (True, False):
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = triton.InferRequestedOutput("logits", binary_data=binary)
            result = client.infer("digits", [inp], outputs=[out])
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6)
            response = result.get_response()
            assert response["model_version"] == "1"
            assert response["parameters"]["where"] == "edge"
        # No outputs named: every output, as JSON.
        result = client.infer("digits", [inp], model_version="1")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6)
    finally:
        client.close()


def test_bad_requests_get_4xx_and_the_agent_stays_healthy(served: Agent) -> None:
    path = "/v2/models/digits/infer"
    cases: list[tuple[str, str, bytes | None, int, str]] = [
        ("GET", "/v2/models/nope", None, 404, "not served"),
        ("GET", "/v2/models/nope/ready", None, 404, "not served"),
        ("POST", "/v2/models/nope/infer", _infer_body(), 404, "not served"),
        ("GET", "/v2/models/digits/versions/7", None, 404, "version"),
        ("POST", path, b"{not json", 400, "malformed JSON"),
        ("POST", path, b"[1, 2]", 400, "JSON object"),
        ("POST", path, json.dumps({"inputs": []}).encode(), 400, "inputs"),
        ("POST", path, _infer_body(name="wrong"), 400, "missing"),
        ("POST", path, _infer_body(shape=[1, 1, 8, 7], data=[0.0] * 56), 400, "shape"),
        ("POST", path, _infer_body(shape=[1, 1, 8, 8], data=[0.0] * 3), 400, "do not fit"),
        ("POST", path, _infer_body(datatype="FP64"), 400, "float32"),
        ("POST", path, _infer_body(datatype="BYTES"), 400, "unsupported datatype"),
        ("POST", path, _infer_body(data=["a"] * 64), 400, "not FP32"),
        ("POST", path, _infer_body(shape="x"), 400, "shape"),
        ("POST", path, b"{" + b" " * (70 * 1024) + b"}", 413, "over the limit"),
    ]
    for method, url, body, status, text in cases:
        got, _headers, doc = _request(
            served, method, url, body, {"Content-Type": "application/json"}
        )
        assert got == status, (url, body[:60] if body else None, doc)
        assert text in doc["error"], (url, doc)
    # Binary extension with a lying header.
    got, _h, doc = _request(
        served, "POST", path, _infer_body(), {"Inference-Header-Content-Length": "99999"}
    )
    assert got == 400 and "Inference-Header-Content-Length" in doc["error"]
    # Over capacity: the only slot is taken and the queue is empty -> 429 with Retry-After.
    served.admission.acquire(None)
    try:
        got, headers, doc = _request(served, "POST", path, _infer_body())
        assert got == 429 and headers["retry-after"] == "1" and "capacity" in doc["error"]
    finally:
        served.admission.release("digits", 0.0, 0.0, True)
    # Still healthy.
    assert _request(served, "GET", "/v2/health/live")[0] == 200
    assert _request(served, "GET", "/v2/health/ready")[0] == 200
    got, _h, doc = _request(served, "POST", path, _infer_body())
    assert got == 200 and doc["model_name"] == "digits" and len(doc["outputs"][0]["data"]) == 10


def test_ready_is_503_without_models(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(http=HTTP)
    assert _request(agent, "GET", "/v2/health/live")[0] == 200
    assert _request(agent, "GET", "/v2/health/ready")[0] == 503


def test_errors_keep_the_keep_alive_connection_usable(served: Agent) -> None:
    assert served.http_url is not None
    url = urlsplit(served.http_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        for body, status in [
            (b"{bad", 400),
            (_infer_body(name="x"), 400),
            (_infer_body(), 200),
        ] * 3:
            conn.request("POST", "/v2/models/digits/infer", body=body)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status
        conn.request("GET", "/v2/models/unknown")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
    finally:
        conn.close()


def test_routing_parameters_pass_through_tritonclient(served: Agent) -> None:
    assert served.http_url is not None
    client = triton.InferenceServerClient(url=served.http_url.removeprefix("http://"))
    x = sample_input()
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)

    def infer(parameters: dict[str, Any]) -> dict[str, Any]:
        result = client.infer("digits", [inp], parameters=parameters)
        params: dict[str, Any] = result.get_response()["parameters"]
        return params

    try:
        before = served.router.stats.budgeted
        params = infer({"policy": "local-only", "budget_ms": 5000, "on_no_path": "refuse"})
        assert params["where"] == "edge" and params["met_budget"] is True
        assert params["late"] is False and params["latency_ms"] > 0
        assert served.router.stats.budgeted == before + 1  # the budget reached the router
        # An unmeetable budget (the local estimate is known by now): "run-late" runs
        # it anyway, marked late; "refuse" is a 503 at once.
        late = infer({"policy": "local-only", "budget_ms": 1e-9, "on_no_path": "run-late"})
        assert late["where"] == "edge" and late["late"] is True and late["met_budget"] is False
        with pytest.raises(InferenceServerException) as refused:
            infer({"policy": "local-only", "budget_ms": 1e-9, "on_no_path": "refuse"})
        assert refused.value.status() == "503" and "budget" in str(refused.value)
    finally:
        client.close()


def test_bad_routing_parameters_get_400(served: Agent) -> None:
    path = "/v2/models/digits/infer"
    item = json.loads(_infer_body())["inputs"]
    cases: list[tuple[Any, str]] = [
        ("x", "'parameters' must be an object"),
        ({"policy": "nope"}, "unknown routing policy"),
        ({"policy": 3}, "parameters.policy must be a string"),
        ({"on_no_path": "maybe"}, "on_no_path must be"),
        ({"on_no_path": ["refuse"]}, "parameters.on_no_path must be a string"),
        ({"budget_ms": -1}, "budget_ms must be a positive number"),
        ({"budget_ms": True}, "budget_ms must be a positive number"),
    ]
    for parameters, text in cases:
        body = json.dumps({"inputs": item, "parameters": parameters}).encode()
        got, _h, doc = _request(served, "POST", path, body)
        assert got == 400 and text in doc["error"], (parameters, doc)
    assert served.status().errors == 0
    got, _h, doc = _request(served, "POST", path, _infer_body())
    assert got == 200 and doc["parameters"]["where"] == "edge"
