"""One small HTTP server for fleet health: Prometheus metrics, a web page and JSON.

Routes: ``/metrics`` (Prometheus text format), ``/`` (an HTML page that refreshes
itself), ``/api/summary`` and ``/api/devices`` (JSON; filtered with ``?group=``,
``class=``, ``model=NAME[:VERSION]``, ``offline=1``), ``/healthz``. The standard
library's ThreadingHTTPServer is plenty for scrapes and a few browsers.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fogline.protocol import ConfigError, FleetError

from ._metrics import FleetCollector, fleet_registry
from ._monitor import MonitorStats
from ._select import DeviceFilter
from ._store import FleetStore
from ._summary import AttentionThresholds, FleetSummary, summarize

__all__ = ["FleetWebServer", "render_html"]

log = logging.getLogger("fogline.fleet.web")


def _fmt(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def render_html(summary: FleetSummary, refresh_s: int = 5) -> str:
    """The summary as a self-refreshing HTML page (every value escaped)."""
    e = html.escape
    figures = [
        (
            "Devices",
            f"{summary.devices_total} ({summary.devices_online} online, "
            f"{summary.devices_offline} offline)",
        ),
        ("Requests", str(summary.requests_total)),
        ("Request rate", _fmt(summary.request_rate_per_s, " /s")),
        ("Latency p50 (median of devices)", _fmt(summary.latency_p50_ms, " ms")),
        ("Latency p99 (max of devices)", _fmt(summary.latency_p99_ms, " ms")),
        ("Offload ratio", _fmt(summary.offload_ratio, " %", 100)),
        ("Met budget", _fmt(summary.met_budget_share, " %", 100)),
        ("Error rate", _fmt(summary.error_rate, " %", 100, 2)),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in figures)
    versions = "".join(
        f"<tr><td>{e(m.model)}</td><td>v{v}{' (newest)' if v == m.latest_version else ''}</td>"
        f"<td>{n}</td></tr>"
        for m in summary.models
        for v, n in m.versions.items()
    )
    attention = (
        "".join(
            f"<tr><td>{e(a.device_id)}</td><td>{e(', '.join(a.reasons))}</td>"
            f"<td>{e(a.detail)}</td></tr>"
            for a in summary.attention
        )
        or '<tr><td colspan="3">none</td></tr>'
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh_s}">
<title>Fogline fleet</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}</style></head>
<body><h1>Fogline fleet</h1>
<table>{rows}</table>
<h2>Model versions</h2>
<table><tr><th>model</th><th>version</th><th>devices</th></tr>{versions}</table>
<h2>Needs attention</h2>
<table><tr><th>device</th><th>reasons</th><th>detail</th></tr>{attention}</table>
<p><a href="/metrics">metrics</a> · <a href="/api/summary">summary JSON</a> ·
<a href="/api/devices">devices JSON</a></p></body></html>
"""


class FleetWebServer:
    """Serve fleet health over HTTP from ``store``; ``port=0`` picks a free port."""

    def __init__(
        self,
        store: FleetStore,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        thresholds: AttentionThresholds | None = None,
        stats: Callable[[], MonitorStats] | None = None,
    ) -> None:
        self.store = store
        self.thresholds = thresholds or AttentionThresholds()
        self._registry = fleet_registry(FleetCollector(self.summary, stats))
        try:
            self._server = ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as exc:
            raise FleetError(f"cannot serve fleet metrics on {host}:{port}: {exc}") from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def summary(self) -> FleetSummary:
        return summarize(self.store.devices(), thresholds=self.thresholds)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="fleet-web", daemon=True
            )
            self._thread.start()
            log.info("fleet metrics and page on %s", self.url)

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FleetWebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        path, _, query = path.partition("?")
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/":
            return HTTPStatus.OK, "text/html; charset=utf-8", render_html(self.summary()).encode()
        if path == "/api/summary":
            return HTTPStatus.OK, "application/json", self.summary().model_dump_json().encode()
        if path == "/api/devices":
            try:
                wanted = _device_filter(query)
            except ConfigError as exc:
                return HTTPStatus.BAD_REQUEST, "text/plain", f"{exc.message}\n".encode()
            rows = [d for d in self.store.devices() if wanted.matches(d)]
            body = json.dumps([d.model_dump(mode="json") for d in rows])
            return HTTPStatus.OK, "application/json", body.encode()
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain", b"ok\n"
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    status, ctype, body = web._route(self.path)
                except FleetError as exc:
                    status, ctype = HTTPStatus.SERVICE_UNAVAILABLE, "text/plain"
                    body = f"{exc.code}: {exc.message}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        return Handler


def _device_filter(query: str) -> DeviceFilter:
    """``offline=1``, ``group=``, ``class=``, ``model=NAME[:VERSION]``; nothing else."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"offline", "group", "class", "model"})
    if unknown:
        raise ConfigError(f"unknown device filter {unknown[0]!r}")
    one = {k: v[-1] for k, v in params.items()}
    return DeviceFilter.parse(
        offline=one.get("offline", "0") not in ("", "0", "false"),
        group=one.get("group"),
        device_class=one.get("class"),
        model=one.get("model"),
    )
