"""The main job (``make demo``): from nothing to a serving, monitored, updated fleet.

Steps, all in this one process through the public APIs:

1. broker: ``$FOGLINE_BROKER_URL`` if set (and answering), else a development broker
   of our own (Mosquitto with a generated config on a free port, else embedded amqtt);
2. Ray: local, or the cluster ``$RAY_ADDRESS`` names;
3. train the reference model (``digits-cnn``) on Ray Train, export it to ONNX, quantize
   it, measure the variants as Ray tasks and gate them per device class (table shown);
4. sign and publish release v1 to the whole fleet;
5. start the cloud services: artifact service, cloud inference (Ray Serve + MQTT
   bridge) and the fleet monitor; then a simulated fleet of real edge agents in mixed
   profiles, one ``mcu-gateway`` too weak for any local variant;
6. drive inference traffic with latency budgets while a live panel shows fleet health
   as the fleet monitor sees it;
7. meanwhile train v2 (new seed, fewer epochs), publish it, and time how long it takes
   to reach every device that runs a local model (and for the monitor to see that);
8. kill one device and show the monitor mark it offline;
9. stop the traffic and print the final report, cross-checking the monitor's summary
   with the simulator's ground truth;
10. stop everything it started, also on Ctrl-C or an error (one ``ExitStack``).

Options: ``--devices``, ``--epochs``, ``--duration``, ``--json``, ``--data-dir``,
``--keep`` (see ``--help``). ``make demo DEMO_ARGS="--devices 8"`` passes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _demo_* helpers

from _demo_view import Check, checks_table, gate_table, live_view, report_table

from fogline.cloud import (
    CloudSettings,
    PipelineResult,
    Registry,
    load_settings,
    load_signing_key,
    publish_release,
    run_pipeline,
)
from fogline.cloud.fleet import FleetSettings, SqliteFleetStore, summarize
from fogline.cloud.serving import CloudServices, start_cloud_services
from fogline.firmware_sim import (
    FleetReport,
    LognormalBudget,
    SensorConfig,
    SimulatedFleet,
)
from fogline.protocol import (
    FoglineError,
    MqttSettings,
    MqttTransport,
    development_broker,
)

MODEL = "digits-cnn"
HEARTBEAT_S = 1.0
RATE_PER_DEVICE = 2.0  # requests/s per device (Poisson)
WEAK_PROFILE = "mcu-gateway"
BUDGET_MEDIAN_MS = 400.0

log = logging.getLogger("fogline.demo")


@dataclass
class Run:
    """What the run measured, for the final report."""

    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    gate: dict[int, dict[str, str | None]] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)
    kill: dict[str, Any] | None = None

    def lap(self, name: str, since: float) -> None:
        self.timings[name] = time.monotonic() - since


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs for v1 (default 2)")
    p.add_argument(
        "--duration", type=float, default=45.0, help="seconds of traffic at least (default 45)"
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--data-dir", type=Path, help="keep all state here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp data dir at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.devices < 2:
        p.error("--devices must be at least 2 (one mcu-gateway and one device with a model)")
    if args.epochs < 1 or args.duration <= 0:
        p.error("--epochs must be >= 1 and --duration > 0")
    return args


def profile_mix(devices: int) -> dict[str, float]:
    """Exactly one weak device; the rest 60/40 rpi4 / jetson-like (weights are counts)."""
    rest = devices - 1
    rpi4 = max(1, round(rest * 0.6)) if rest > 1 else rest
    mix = {"rpi4": float(rpi4), "jetson-like": float(rest - rpi4), WEAK_PROFILE: 1.0}
    return {k: v for k, v in mix.items() if v > 0}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every cleanup in the ExitStack runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_ray(stack: contextlib.ExitStack) -> str:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or None
    from fogline.cloud._ray_backend import LOCAL_RAY_SYSTEM_CONFIG

    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG,
    )
    stack.callback(ray.shutdown)  # a local Ray goes away with it; a cluster stays up
    return address or "local"


def train(
    version_label: str,
    epochs: int,
    seed: int,
    settings: CloudSettings,
    registry: Registry,
    console: Console,
    *,
    progress: bool,
) -> PipelineResult:
    log.info("training %s (%d epochs, seed %d)", version_label, epochs, seed)
    return run_pipeline(
        MODEL,
        epochs=epochs,
        seed=seed,
        settings=settings,
        registry=registry,
        progress=progress,
        console=console,
        repeats=30,  # enough for a stable median on a tiny CNN
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, poll_s: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held, or None after ``timeout``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            return None
        time.sleep(poll_s)


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.run = Run()
        self.phase = "starting"
        self.cloud: CloudServices | None = None
        self.fleet: SimulatedFleet | None = None
        self.truth: FleetReport | None = None

    # -- the live panel (redrawn by rich's refresh thread while the main thread works) ----
    @property
    def store(self) -> SqliteFleetStore:
        assert self.cloud is not None and self.cloud.fleet_store is not None
        return self.cloud.fleet_store

    def render(self) -> Any:
        devices = self.store.devices()
        return live_view(
            self.phase, time.monotonic() - self.run.started, summarize(devices), devices
        )

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]▸[/bold cyan] {text}")

    def local_devices(self, assigned: set[str]) -> list[str]:
        """Running devices whose class has a variant (the ones an update reaches)."""
        assert self.fleet is not None
        return [
            d.device_id
            for d in self.fleet.devices.values()
            if d.agent is not None and d.profile.device_class in assigned
        ]

    def main(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        args, console, run = self.args, self.console, self.run

        # 1. data directory
        if args.data_dir is not None:
            data_dir = args.data_dir.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="fogline-demo-"))
            if not args.keep:
                stack.callback(shutil.rmtree, data_dir, ignore_errors=True)
        self.say(f"data directory [bold]{data_dir}[/bold]")

        # 2. broker: the user's if set, else one of our own with TCP_NODELAY
        t = time.monotonic()
        broker = stack.enter_context(development_broker(os.environ.get("FOGLINE_BROKER_URL")))
        self.say(f"broker [bold]{broker.url}[/bold] ({broker.kind})")

        # 3. Ray
        where = start_ray(stack)
        run.lap("broker_and_ray", t)
        self.say(f"Ray: {where}")

        # 4. train, export, quantize, gate (v1)
        settings = load_settings(
            data_dir=data_dir,
            broker_url=broker.url,
            # one small replica: the 2 cores also run the fleet (and training v2)
            serve={"deployment": {"num_replicas": 1, "num_cpus": 0.25}},
        )
        registry = Registry(settings.data_dir)
        t = time.monotonic()
        self.say(f"training [bold]{MODEL}[/bold] on Ray Train ({args.epochs} epochs)")
        v1 = train("v1", args.epochs, args.seed, settings, registry, console, progress=True)
        run.lap("train_v1", t)
        run.gate[v1.record.version] = {c: d.chosen for c, d in v1.decisions.items()}
        console.print(gate_table(v1.measurements, v1.decisions, v1.record.ref))
        assigned = set(v1.record.assignments)

        # 5. publish v1 (signed, fleet scope) and start the cloud services
        transport = MqttTransport(
            MqttSettings(url=broker.url), client_id=f"fogline-demo-cloud-{os.getpid()}"
        )
        transport.connect()
        stack.callback(transport.close)
        key = load_signing_key(settings.data_dir)
        publish_release(registry, MODEL, v1.record.version, transport, key, scope="fleet")
        self.say(f"published [bold]{v1.record.ref}[/bold] to the fleet (signed {key.key_id})")
        t = time.monotonic()
        port = free_port()
        self.cloud = start_cloud_services(
            settings,
            transport,
            serve_models=[MODEL],  # the newest published version, followed on releases
            fleet=True,
            metrics_port=port,
            fleet_settings=FleetSettings(
                data_dir=settings.data_dir, heartbeat_interval_s=HEARTBEAT_S
            ),
        )
        stack.callback(self.cloud.close)
        run.lap("cloud_services", t)
        self.say(
            "cloud services up: artifact service, Ray Serve + MQTT bridge (serving "
            f"v{self.cloud.served_versions().get(MODEL)}), fleet monitor "
            f"(web page and metrics at {self.cloud.metrics_url})"
        )

        # 6. the simulated fleet
        t = time.monotonic()
        fleet = SimulatedFleet(
            devices=args.devices,
            profile_mix=profile_mix(args.devices),
            broker_url=broker.url,
            trusted_keys=[key.public_key.to_text()],
            data_root=settings.data_dir / "fleet",
            models=[MODEL],
            seed=args.seed,
            rate_per_device=RATE_PER_DEVICE,
            heartbeat_interval_s=HEARTBEAT_S,
            flaps=False,  # faults here are deliberate, so the report can explain them
            control=False,
            # Budgets a cellular round trip (~200 ms for the mcu-gateway) mostly meets.
            sensor=SensorConfig(budget=LognormalBudget(median_ms=BUDGET_MEDIAN_MS, sigma=0.4)),
        )
        self.fleet = fleet
        stack.callback(fleet.stop)
        with _progress(console) as bar:
            task = bar.add_task("starting edge agents", total=args.devices, info="")
            fleet.start(lambda done, _n: bar.update(task, completed=done), traffic=False)
            task = bar.add_task("connect, fetch, verify, install v1", total=1, info="")
            settled = fleet.settle(60.0)
            bar.update(task, completed=1, info="settled" if settled else "not settled")
        run.lap("fleet_start", t)

        # 7-9. traffic, live panel, update, kill
        with Live(get_renderable=self.render, console=console, refresh_per_second=4):
            self.traffic_update_kill(registry, transport, key, settings, assigned, v1)
        console.print()
        return self.report(broker.url, broker.kind, where)

    def traffic_update_kill(
        self,
        registry: Registry,
        transport: MqttTransport,
        key: Any,
        settings: CloudSettings,
        assigned: set[str],
        v1: PipelineResult,
    ) -> None:
        args, run = self.args, self.run
        fleet, cloud = self.fleet, self.cloud
        assert fleet is not None and cloud is not None
        traffic_started = time.monotonic()
        fleet.start_traffic()
        self.phase = f"traffic on v{v1.record.version}"
        self.say(
            f"traffic: {RATE_PER_DEVICE:g} requests/s per device, lognormal budgets "
            f"around {BUDGET_MEDIAN_MS:g} ms"
        )
        time.sleep(min(10.0, args.duration * 0.25))

        # Train v2 while the fleet serves v1 (the panel keeps refreshing meanwhile).
        self.phase = "training v2 on Ray (fleet keeps serving v1)"
        t = time.monotonic()
        v2 = train(
            "v2",
            max(1, args.epochs // 2),
            args.seed + 1,
            settings,
            registry,
            self.console,
            progress=False,
        )
        run.lap("train_v2", t)
        run.gate[v2.record.version] = {c: d.chosen for c, d in v2.decisions.items()}
        new = v2.record.version

        # Publish v2 and time the rollout: agents (truth) and monitor (heartbeats).
        self.phase = f"rolling out v{new}"
        targets = self.local_devices(set(v2.record.assignments) & assigned)
        published = time.monotonic()
        publish_release(registry, MODEL, new, transport, key, scope="fleet")

        def agents_done() -> bool:
            return all(
                (a := fleet.device(d).agent) is not None and a.installed_version(MODEL) == new
                for d in targets
            )

        def monitor_done() -> bool:
            records = {r.device_id: r for r in self.store.devices()}
            return all(
                (r := records.get(d)) is not None
                and r.heartbeat is not None
                and r.heartbeat.models.get(MODEL) == new
                for d in targets
            )

        self.say(
            f"published [bold]{v2.record.ref}[/bold] (trained in {run.timings['train_v2']:.0f}s "
            "while the fleet kept serving v1)"
        )
        fleet_s = wait_until(agents_done, 90.0)
        monitor_s = wait_until(monitor_done, 30.0)
        if monitor_s is not None:
            monitor_s = time.monotonic() - published
        if fleet_s is not None:
            self.say(
                f"v{new} served by all {len(targets)} devices with a local model "
                f"{fleet_s:.2f}s after publishing; the monitor saw it after {monitor_s or 0:.2f}s"
            )
        else:
            self.say(f"[red]v{new} did not reach every device within 90s[/red]")
        run.update = {
            "from_version": v1.record.version,
            "to_version": new,
            "devices": len(targets),
            "fleet_converged_s": fleet_s,
            "monitor_converged_s": monitor_s,
        }
        # The cloud's release follower redeploys Serve on the new (signed) release.
        self.phase = f"serving v{new}; cloud inference following to v{new}"
        cloud_s = wait_until(lambda: cloud.served_versions().get(MODEL) == new, 60.0)
        if cloud_s is not None:
            cloud_s = time.monotonic() - published
            self.say(f"cloud inference (Ray Serve) serves v{new} {cloud_s:.1f}s after publishing")
        run.update["cloud_serving_s"] = cloud_s

        # Kill one device with a local model: its link is cut, the broker publishes its
        # last will, and the monitor marks it offline.
        victim = sorted(targets)[-1] if targets else None
        if victim is not None:
            self.phase = f"killing {victim}"
            killed = time.monotonic()
            fleet.inject("kill", victim)
            seen = wait_until(lambda: not self.store.device(victim).online, 15.0)
            if seen is not None:
                seen = time.monotonic() - killed
                self.say(
                    f"killed {victim}: the fleet monitor marked it offline in {seen:.2f}s "
                    f"({self.store.device(victim).status_reason})"
                )
            run.kill = {
                "device_id": victim,
                "monitor_offline_after_s": seen,
                "reason": self.store.device(victim).status_reason,
            }
            self.phase = f"{victim} killed {time.monotonic() - killed:.0f}s ago"

        # Keep serving until --duration (at least a few heartbeats after the kill).
        end = max(traffic_started + args.duration, time.monotonic() + 3 * HEARTBEAT_S)
        while time.monotonic() < end:
            if victim is not None:
                self.phase = f"serving v{new}, {victim} killed"
            time.sleep(0.25)
        self.phase = "stopping traffic, final heartbeats"
        fleet.stop_traffic()
        run.lap("traffic", traffic_started)
        # Every running agent reports once more after the last request; then the
        # monitor has written everything it received.
        time.sleep(2 * HEARTBEAT_S + 0.5)
        if cloud.monitor is not None:
            cloud.monitor.flush(10.0)
        self.phase = "done"

    def report(self, broker_url: str, broker_kind: str, ray_where: str) -> dict[str, Any]:
        fleet, cloud, run = self.fleet, self.cloud, self.run
        assert fleet is not None and cloud is not None
        truth = self.truth = fleet.report()
        records = {d.device_id: d for d in self.store.devices()}
        summary = summarize(list(records.values()))
        online = [d for d in records.values() if d.online]

        def versions(pairs: list[dict[str, int]]) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for models in pairs:
                for m, v in models.items():
                    out.setdefault(m, {}).setdefault(str(v), 0)
                    out[m][str(v)] += 1
            return {m: dict(sorted(per.items())) for m, per in sorted(out.items())}

        monitor_running = versions([d.heartbeat.models for d in online if d.heartbeat])
        truth_running = versions([d.versions for d in truth.per_device if d.running])
        killed = [d for d in truth.per_device if not d.running]
        # The monitor learns of requests at each heartbeat: a killed device's last
        # interval of traffic is never reported. Running devices sent a final heartbeat
        # after the traffic stopped, so for them the counts must match exactly.
        slack = sum(math.ceil(RATE_PER_DEVICE * HEARTBEAT_S * 3) + 2 for _ in killed)
        edge = sum(d.totals.edge_requests for d in records.values())
        cloud_n = sum(d.totals.cloud_requests for d in records.values())
        checks = [
            Check("devices", summary.devices_total, truth.devices),
            Check("devices online", summary.devices_online, truth.connected),
            Check("versions of running devices", monitor_running, truth_running),
            Check(
                "answered requests (edge + cloud)", edge + cloud_n, truth.edge + truth.cloud, slack
            ),
            Check("edge requests", edge, truth.edge, slack),
            Check("cloud requests", cloud_n, truth.cloud, slack),
        ]
        per_device = []
        for d in truth.per_device:
            rec = records.get(d.device_id)
            per_device.append(
                {
                    "device_id": d.device_id,
                    "profile": d.profile,
                    "device_class": d.device_class,
                    "running": d.running,
                    "online": bool(rec and rec.online),
                    "serving": d.versions,
                    "reported": dict(rec.heartbeat.models) if rec and rec.heartbeat else {},
                    "sent": d.sent,
                    "answered": d.answered,
                    "monitor_requests": rec.totals.requests if rec else 0,
                }
            )
        return {
            "ok": all(c.ok for c in checks) and run.update.get("fleet_converged_s") is not None,
            "broker": {"url": broker_url, "kind": broker_kind},
            "ray": ray_where,
            "model": MODEL,
            "gate": {str(v): g for v, g in run.gate.items()},
            "fleet": {
                "devices": summary.devices_total,
                "online": summary.devices_online,
                "offline": summary.devices_offline,
                "by_profile": truth.devices_by_profile,
                "versions": {
                    m.model: {str(v): n for v, n in m.versions.items()} for m in summary.models
                },
                "per_device": per_device,
            },
            "latency_ms": {
                "edge_p50": _or_none(truth.edge_latency_p50_ms, truth.edge),
                "edge_p99": _or_none(truth.edge_latency_p99_ms, truth.edge),
                "cloud_p50": _or_none(truth.cloud_latency_p50_ms, truth.cloud),
                "cloud_p99": _or_none(truth.cloud_latency_p99_ms, truth.cloud),
                "monitor_p50": summary.latency_p50_ms,
                "monitor_p99": summary.latency_p99_ms,
            },
            "requests": {
                "sent": truth.sent,
                "answered": truth.answered,
                "edge": truth.edge,
                "cloud": truth.cloud,
                "errors": truth.errors,
                "error_codes": truth.error_codes,
                "monitor_total": summary.requests_total,
            },
            "offload_ratio": summary.offload_ratio,
            "met_budget_share": summary.met_budget_share,
            "accuracy": truth.accuracy if truth.answered else None,
            "update": run.update,
            "kill": run.kill,
            "checks": [c.to_dict() for c in checks],
            "timings_s": {k: round(v, 2) for k, v in run.timings.items()},
        }


def _or_none(value: float, count: int) -> float | None:
    return value if count else None


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.serve", "ray.train", "ray.tune", "ray.data", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logs()
    # With --json, stdout carries only the report; everything else goes to stderr.
    console = Console(stderr=True) if args.json else Console()
    started = time.monotonic()
    demo = Demo(args, console)
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            report = demo.main(stack)
            console.print(
                "[bold cyan]▸[/bold cyan] stopping the fleet, cloud services, Ray and the broker"
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything started was stopped[/yellow]")
        return 130
    except FoglineError as exc:
        console.print(f"[red]demo failed ({exc.code}):[/red] {exc.message}")
        return 1
    report["timings_s"]["total"] = round(time.monotonic() - started, 2)
    if args.json:
        # Plain write: a rich console could wrap a long line inside the JSON.
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        assert demo.truth is not None
        console.print(report_table(report, demo.truth))
        console.print(
            checks_table(
                [
                    Check(c["figure"], c["monitor"], c["simulator"], c["tolerance"])
                    for c in report["checks"]
                ]
            )
        )
    if not report["ok"]:
        console.print("[red]the fleet monitor and the simulator disagree (see above)[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
