"""The Open Inference Protocol (KServe / Triton "v2") over one agent, apart from any
socket: routes, JSON tensors plus Triton's binary tensor extension (tritonclient's HTTP
client uses it by default), and replies. :mod:`._http` serves it.

Routing options ride in the request-level ``parameters`` (``budget_ms``, ``policy``,
``on_no_path``, as for :meth:`Agent.infer`); the response ``parameters`` say where the
request ran, its latency, whether it was late and (with a budget) whether it met it.

Every failure becomes a JSON ``{"error": "..."}`` with a 4xx/5xx status, mapped from
Fogline errors in :func:`status_of` only: unknown model 404, bad input 400, oversize
body 413, over capacity 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fogline.protocol import (
    BudgetExceededError,
    CapacityError,
    CloudUnavailableError,
    FoglineError,
    InferenceInputError,
    UnknownModelError,
)

from ._config import HttpConfig

if TYPE_CHECKING:
    from ._agent import Agent

__all__ = ["HttpError", "Reply", "V2Api", "json_reply", "status_of"]


_TO_V2 = {
    "bool": "BOOL",
    "int8": "INT8",
    "uint8": "UINT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
_FROM_V2 = {v: np.dtype(k) for k, v in _TO_V2.items()}
_HEADER_LENGTH = "inference-header-content-length"
_MAX_ELEMENTS = 1 << 24
_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)
_JSON = "application/json"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(exc: FoglineError) -> tuple[int, dict[str, str] | None]:
    """The one place where Fogline errors become HTTP statuses."""
    if isinstance(exc, UnknownModelError):
        return 404, None
    if isinstance(exc, InferenceInputError):
        return 400, None
    if isinstance(exc, CapacityError):
        return 429, {"Retry-After": "1"}
    if isinstance(exc, BudgetExceededError | CloudUnavailableError):
        return 503, {"Retry-After": "1"}
    return 500, None


def _spec_json(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": _TO_V2[spec.dtype], "shape": list(spec.shape)}


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HttpError(400, f"bad Inference-Header-Content-Length {header_length!r}")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "the request must be a JSON object")
    return doc, binary


def _decode_inputs(doc: dict[str, Any], binary: bytes) -> dict[str, np.ndarray]:
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise HttpError(400, "'inputs' must be a non-empty list")
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for item in items:
        if not isinstance(item, dict):
            raise HttpError(400, "each input must be an object")
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "each input needs a 'name'")
        if name in arrays:
            raise HttpError(400, f"input {name!r} is given twice")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise HttpError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
        dtype = _FROM_V2.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise HttpError(
                400,
                f"input {name!r}: unsupported datatype {datatype!r}; use one of {sorted(_FROM_V2)}",
            )
        count = math.prod(shape)
        if count > _MAX_ELEMENTS:
            raise HttpError(413, f"input {name!r} has {count} elements; at most {_MAX_ELEMENTS}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise HttpError(400, f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or pos + size > len(binary):
                raise HttpError(400, f"input {name!r}: binary_data_size does not fit the body")
            raw = binary[pos : pos + size]
            pos += size
            if size != count * dtype.itemsize:
                raise HttpError(
                    400,
                    f"input {name!r}: {size} binary bytes do not fit shape {shape} of {datatype}",
                )
            array = (
                np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
                .astype(dtype, copy=False)
                .reshape(shape)
            )
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise HttpError(400, f"input {name!r}: 'data' must be a list")
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise HttpError(400, f"input {name!r}: data is not {datatype}: {exc}") from None
            if array.size != count:
                raise HttpError(
                    400, f"input {name!r}: {array.size} values do not fit shape {shape}"
                )
            array = array.reshape(shape)
        arrays[name] = array
    return arrays


def _requested_outputs(doc: dict[str, Any], available: tuple[str, ...]) -> list[tuple[str, bool]]:
    params = doc.get("parameters") or {}
    all_binary = bool(isinstance(params, dict) and params.get("binary_data_output"))
    wanted = doc.get("outputs")
    if wanted is None:
        return [(n, all_binary) for n in available]
    if not isinstance(wanted, list):
        raise HttpError(400, "'outputs' must be a list")
    result = []
    for item in wanted:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in available:
            raise HttpError(400, f"unknown output {name!r}; the model has {list(available)}")
        p = item.get("parameters") or {}
        result.append((name, bool(isinstance(p, dict) and p.get("binary_data", all_binary))))
    return result


def _routing_parameters(doc: dict[str, Any]) -> tuple[float | None, str | None, Any]:
    """``budget_ms``, ``policy`` and ``on_no_path`` from the request-level ``parameters``
    (the v2 protocol's place for per-request options). Types are checked here; the
    agent checks the values (an unknown policy is its :class:`InferenceInputError`)."""
    params = doc.get("parameters")
    if params is None:
        return None, None, None
    if not isinstance(params, dict):
        raise HttpError(400, "'parameters' must be an object")
    budget = params.get("budget_ms")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
    ):
        raise HttpError(400, "parameters.budget_ms must be a positive number")
    for key in ("policy", "on_no_path"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise HttpError(400, f"parameters.{key} must be a string")
    return budget, params.get("policy"), params.get("on_no_path")


Reply = tuple[int, bytes, str, dict[str, str] | None]
"""(status, body, content type, extra headers)"""


class Headers(Protocol):
    def get(self, name: str, /) -> str | None: ...


class Request(Protocol):
    """What a route needs from the server: the headers, and the body on demand (so an
    unknown model is refused before a large body is read)."""

    @property
    def headers(self) -> Headers: ...

    def read_body(self, limit: int) -> bytes: ...


def json_reply(
    doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Reply:
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return status, body.encode(), _JSON, headers


def _respond(doc: dict[str, Any], result: Any, wanted: list[tuple[str, bool]]) -> Reply:
    outputs = []
    blobs: list[bytes] = []
    for name, as_binary in wanted:
        array = np.ascontiguousarray(result.outputs[name])
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _TO_V2.get(array.dtype.name, "FP32"),
            "shape": list(array.shape),
        }
        if as_binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    parameters: dict[str, Any] = {
        "where": result.where,
        "latency_ms": result.latency_ms,
        "late": result.late,
    }
    if result.met_budget is not None:
        parameters["met_budget"] = result.met_budget
    body: dict[str, Any] = {
        "model_name": result.model,
        "model_version": str(result.version),
        "outputs": outputs,
        "parameters": parameters,
    }
    if isinstance(doc.get("id"), str):
        body["id"] = doc["id"]
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return 200, head, _JSON, None
    return (
        200,
        head + b"".join(blobs),
        "application/octet-stream",
        {"Inference-Header-Content-Length": str(len(head))},
    )


class V2Api:
    """The v2 routes over one agent."""

    def __init__(self, agent: Agent, config: HttpConfig) -> None:
        self.agent = agent
        self.config = config

    def route(self, request: Request, method: str, path: str) -> Reply:
        if path == "/v2":
            self._only(method, "GET")
            return json_reply(
                {"name": "fogline-edge", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
            )
        if path == "/v2/health/live":
            self._only(method, "GET")
            return json_reply({"live": True})
        if path == "/v2/health/ready":
            self._only(method, "GET")
            ok = bool(self.agent.models())
            return json_reply({"ready": ok}, 200 if ok else 503)
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise HttpError(404, f"no route {path}")
        action = match["action"]
        self._only(method, "POST" if action == "/infer" else "GET")
        loaded = self._model(match["name"], match["version"])
        if action == "/infer":
            return self._infer(request, loaded)
        if action == "/ready":
            return json_reply({"name": loaded.name, "ready": True})
        return json_reply(
            {
                "name": loaded.name,
                "versions": [str(loaded.version)],
                "platform": "onnxruntime_onnx",
                "inputs": [_spec_json(s) for s in loaded.inputs],
                "outputs": [_spec_json(s) for s in loaded.outputs],
            }
        )

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            raise HttpError(405, f"method {method} is not allowed here; use {allowed}")

    def _model(self, name: str, version: str | None) -> Any:
        loaded = self.agent.model(name)
        if version is not None and version != str(loaded.version):
            raise UnknownModelError(
                f"model {loaded.name!r} serves version {loaded.version}, not {version}"
            )
        return loaded

    def _infer(self, request: Request, loaded: Any) -> Reply:
        body = request.read_body(self.config.max_body_bytes)
        doc, binary = _parse_request(body, request.headers.get(_HEADER_LENGTH))
        inputs = _decode_inputs(doc, binary)
        wanted = _requested_outputs(doc, loaded.output_names)
        budget, policy, on_no_path = _routing_parameters(doc)
        result = self.agent.infer(loaded.name, inputs, budget, policy, on_no_path)
        return _respond(doc, result, wanted)
