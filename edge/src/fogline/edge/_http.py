"""The local HTTP API: the Open Inference Protocol (KServe / Triton "v2"), JSON tensors
plus Triton's binary tensor extension (tritonclient's HTTP client uses it by default).

Starlette app, served by uvicorn on its own thread. Inference runs in the threadpool so
a request waiting for capacity never blocks the event loop. Every failure becomes a
JSON ``{"error": "..."}`` with a 4xx/5xx status, mapped from Fogline errors in
:func:`_status_of` only: unknown model 404, bad input 400, oversize body 413, over
capacity 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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

__all__ = ["HttpServer", "build_app"]

log = logging.getLogger("fogline.edge.http")

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


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_of(exc: FoglineError) -> tuple[int, dict[str, str] | None]:
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


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HttpError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HttpError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _HttpError(400, f"bad Inference-Header-Content-Length {header_length!r}")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HttpError(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _HttpError(400, "the request must be a JSON object")
    return doc, binary


def _decode_inputs(doc: dict[str, Any], binary: bytes) -> dict[str, np.ndarray]:
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise _HttpError(400, "'inputs' must be a non-empty list")
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for item in items:
        if not isinstance(item, dict):
            raise _HttpError(400, "each input must be an object")
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise _HttpError(400, "each input needs a 'name'")
        if name in arrays:
            raise _HttpError(400, f"input {name!r} is given twice")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _HttpError(
                400, f"input {name!r}: 'shape' must be a list of non-negative integers"
            )
        dtype = _FROM_V2.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise _HttpError(
                400,
                f"input {name!r}: unsupported datatype {datatype!r}; use one of {sorted(_FROM_V2)}",
            )
        count = math.prod(shape)
        if count > _MAX_ELEMENTS:
            raise _HttpError(413, f"input {name!r} has {count} elements; at most {_MAX_ELEMENTS}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _HttpError(400, f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or pos + size > len(binary):
                raise _HttpError(400, f"input {name!r}: binary_data_size does not fit the body")
            raw = binary[pos : pos + size]
            pos += size
            if size != count * dtype.itemsize:
                raise _HttpError(
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
                raise _HttpError(400, f"input {name!r}: 'data' must be a list")
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise _HttpError(400, f"input {name!r}: data is not {datatype}: {exc}") from None
            if array.size != count:
                raise _HttpError(
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
        raise _HttpError(400, "'outputs' must be a list")
    result = []
    for item in wanted:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in available:
            raise _HttpError(400, f"unknown output {name!r}; the model has {list(available)}")
        p = item.get("parameters") or {}
        result.append((name, bool(isinstance(p, dict) and p.get("binary_data", all_binary))))
    return result


def build_app(agent: Agent, config: HttpConfig) -> Starlette:
    """The v2 API over one agent."""

    async def live(_request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(_request: Request) -> Response:
        ok = bool(agent.models())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(_request: Request) -> Response:
        return JSONResponse(
            {"name": "fogline-edge", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
        )

    def _model(request: Request) -> Any:
        loaded = agent.model(request.path_params["name"])
        version = request.path_params.get("version")
        if version is not None and version != str(loaded.version):
            raise UnknownModelError(
                f"model {loaded.name!r} serves version {loaded.version}, not {version}"
            )
        return loaded

    async def model_metadata(request: Request) -> Response:
        loaded = _model(request)
        return JSONResponse(
            {
                "name": loaded.name,
                "versions": [str(loaded.version)],
                "platform": "onnxruntime_onnx",
                "inputs": [_spec_json(s) for s in loaded.inputs],
                "outputs": [_spec_json(s) for s in loaded.outputs],
            }
        )

    async def model_ready(request: Request) -> Response:
        loaded = _model(request)
        return JSONResponse({"name": loaded.name, "ready": True})

    async def infer(request: Request) -> Response:
        loaded = _model(request)
        body = await _read_body(request, config.max_body_bytes)
        doc, binary = _parse_request(body, request.headers.get(_HEADER_LENGTH))
        inputs = _decode_inputs(doc, binary)
        wanted = _requested_outputs(doc, loaded.output_names)
        params = doc.get("parameters") or {}
        budget = params.get("budget_ms") if isinstance(params, dict) else None
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
        ):
            raise _HttpError(400, "parameters.budget_ms must be a positive number")
        result = await run_in_threadpool(agent.infer, loaded.name, inputs, budget)
        return _respond(doc, result, wanted)

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, _HttpError):
            return _error(exc.status, exc.message)
        if isinstance(exc, FoglineError):
            status, headers = _status_of(exc)
            return _error(status, exc.message, headers)
        log.exception("unexpected error serving %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    # Expected errors get their own handlers: Starlette re-raises whatever reaches the
    # catch-all ``Exception`` handler after answering, and uvicorn then drops the
    # keep-alive connection and logs a traceback.
    handlers: dict[Any, Any] = {_HttpError: on_error, FoglineError: on_error, Exception: on_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _respond(doc: dict[str, Any], result: Any, wanted: list[tuple[str, bool]]) -> Response:
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
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


class HttpServer:
    """uvicorn on a thread, bound before it starts so ``port = 0`` is known at once."""

    def __init__(self, agent: Agent, config: HttpConfig) -> None:
        self._config = config
        self._app = build_app(agent, config)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only
        # when the listener says TCP; without it Nagle and delayed ACKs add ~40 ms to
        # every keep-alive request.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((config.host, config.port))
        except OSError as exc:
            self._socket.close()
            from fogline.protocol import ConfigError

            raise ConfigError(
                f"config field 'http.port': cannot bind {config.host}:{config.port}: {exc}"
            ) from None
        self.port = int(self._socket.getsockname()[1])
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
                loop="asyncio",
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self._config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="fogline-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
