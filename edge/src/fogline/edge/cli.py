"""``fogline-edge``: run an agent in the foreground, or print its local state.

Stdlib argparse on purpose: the edge stays light (no typer, no rich).

    fogline-edge run --config agent.toml [--json]
    fogline-edge status --config agent.toml [--json]    (or --data-dir DIR)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fogline.protocol import FoglineError

from ._agent import Agent
from ._config import load_config
from ._runtime import glibc, release_freed_heap, trim_heap_after_swaps
from ._status import STATUS_FILE

__all__ = ["main"]

log = logging.getLogger("fogline.edge.cli")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(as_json: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("paho").setLevel(logging.WARNING)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    agent = Agent(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    # Start-up garbage (imports, model parsing, the first heartbeat) is freed by now but
    # still resident until glibc gives it back; swaps trim again (see _runtime).
    trim_heap_after_swaps()
    release_freed_heap()
    serving = {name: m.version for name, m in agent.models().items()}
    ready = {
        "event": "ready",
        "device_id": config.device_id,
        "http_url": agent.http_url,
        "models": serving,
    }
    if args.json:
        _out(json.dumps(ready))
    else:
        what = serving or "nothing yet"
        _out(f"fogline-edge {config.device_id} serving {what} at {agent.http_url}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        agent.stop()
    if args.json:
        _out(json.dumps({"event": "stopped", "device_id": config.device_id}))
    return 0


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _where(status: dict[str, Any]) -> str:
    edge, cloud = status.get("edge_requests", 0), status.get("cloud_requests", 0)
    text = f"edge {edge}, cloud {cloud} (offload {status.get('offload_ratio', 0.0):.1%})"
    extra = [
        f"{status[k]} {label}"
        for k, label in (
            ("cloud_fallbacks", "fell back to edge"),
            ("cascade_escalations", "escalated by cascade"),
            ("cloud_errors", "failed without a local run"),
        )
        if status.get(k)
    ]
    return text + (f"; {', '.join(extra)}" if extra else "")


def _budget(status: dict[str, Any]) -> str:
    budgeted = status.get("budgeted_requests", 0)
    if not budgeted:
        return "no budgeted requests"
    met, ratio = status.get("met_budget", 0), status.get("met_budget_ratio", 1.0)
    return f"{met} / {budgeted} met their budget ({ratio:.1%})"


def _cloud(status: dict[str, Any]) -> str:
    rtt = status.get("cloud_rtt_ms")
    parts = [
        f"policy {status.get('policy', 'local-first')}",
        f"breaker {status.get('breaker_state', 'closed')}",
        "rtt unknown" if rtt is None else f"rtt {rtt:.1f} ms",
    ]
    if status.get("cloud_models"):
        parts.append("cloud-only " + ", ".join(status["cloud_models"]))
    return ", ".join(parts)


def _keys(status: dict[str, Any]) -> str:
    version = status.get("key_set_version", 0)
    keys = ", ".join(status.get("trusted_keys", [])) or "none"
    return f"key set {version} ({keys})" if version else f"configured ({keys})"


def _status(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
    else:
        data_dir = load_config(args.config).data_dir
    path = data_dir / STATUS_FILE
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FoglineError(f"no status at {path}: has the agent run with this data dir?") from None
    except (OSError, ValueError) as exc:
        raise FoglineError(f"cannot read {path}: {exc}") from None
    if args.json:
        _out(json.dumps(status, indent=1))
        return 0
    models = ", ".join(f"{n} v{m['version']}" for n, m in status.get("models", {}).items())
    rows = [
        ("device", f"{status['device_id']} ({status['device_class']})"),
        ("connected", str(status["connected"])),
        ("models", models or "-"),
        (
            "requests",
            f"{status['requests']} ({status['errors']} errors, {status['refused']} refused)",
        ),
        (
            "latency",
            f"p50 {status['latency_p50_ms']:.3f} ms, p99 {status['latency_p99_ms']:.3f} ms",
        ),
        ("ran on", _where(status)),
        ("budget", _budget(status)),
        ("cloud", _cloud(status)),
        ("trusts", _keys(status)),
        (
            "in flight",
            f"{status['in_flight']} / {status['max_in_flight']}, queue {status['queue_depth']}",
        ),
        (
            "telemetry",
            f"{status['telemetry_queued']} queued, {status['telemetry_dropped']} dropped",
        ),
        ("http", str(status.get("http_url") or "-")),
        ("uptime", f"{status['uptime_s']:.0f} s"),
    ]
    _out(_table(rows))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogline-edge", description="Fogline edge agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", required=True, type=Path, help="agent TOML file")
    run.add_argument("--json", action="store_true", help="JSON output and JSON log lines")
    run.add_argument("-v", "--verbose", action="store_true")
    status = sub.add_parser("status", help="print the agent's local state")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="agent TOML file (for its data dir)")
    where.add_argument("--data-dir", type=Path)
    status.add_argument("--json", action="store_true")
    status.add_argument("-v", "--verbose", action="store_true")
    return parser


_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def _limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas. By default each thread that allocates may get its own
    arena (up to 8 per core), each holding freed memory of its own; the agent's few
    threads (MQTT, telemetry, delivery, HTTP connections) do not contend enough to need
    them (-0.7 MB resident). Only takes effect before those threads start; a no-op
    (False) off glibc."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, arenas))


def main(argv: Sequence[str] | None = None) -> int:
    _limit_malloc_arenas()
    args = _parser().parse_args(argv)
    _setup_logging(args.json, args.verbose)
    try:
        if args.command == "run":
            return _run(args)
        return _status(args)
    except FoglineError as exc:
        if args.json:
            _out(json.dumps({"error": exc.message, "code": exc.code}))
        else:
            sys.stderr.write(f"fogline-edge: {exc.message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
