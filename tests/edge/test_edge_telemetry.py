"""Telemetry: retained online state and last will, heartbeats, clean stop, telemetry
kept on disk while the broker is down (none lost within the bound, drops counted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _release_kit import (
    ArtifactServer,
    Observer,
    ReleaseKit,
    build_model,
    publish,
    read_ready,
    spawn_agent,
)

from fogline.edge import Agent, AgentConfig
from fogline.edge._telemetry import Outbox
from fogline.edge.cli import main as cli_main
from fogline.protocol import MosquittoBroker, MqttSettings


def test_last_will_flips_state_offline_when_killed(
    config_factory: Callable[..., AgentConfig],
    observer_factory: Callable[..., Observer],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    obs = observer_factory("dev-will")
    proc = spawn_agent(config_factory("dev-will"), tmp_path / "agent.toml", processes)
    read_ready(proc)
    obs.wait_for(lambda: [s for s in obs.states() if s.status == "online"])
    obs.wait_for(lambda: obs.heartbeats())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    offline = obs.wait_for(lambda: [s for s in obs.states() if s.status == "offline"])
    assert offline[0].device_id == "dev-will"
    # The will is what flipped it: no clean-stop event was sent.
    assert not obs.events(kind="agent_stopping")


def test_clean_stop_on_sigterm_publishes_offline_and_status(
    config_factory: Callable[..., AgentConfig],
    observer_factory: Callable[..., Observer],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    capsys: object,
) -> None:
    obs = observer_factory("dev-term")
    config = config_factory("dev-term")
    proc = spawn_agent(config, tmp_path / "agent.toml", processes)
    read_ready(proc)
    obs.wait_for(lambda: obs.heartbeats())
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    obs.wait_event(kind="agent_stopping")
    obs.wait_for(lambda: [s for s in obs.states() if s.status == "offline"])
    assert cli_main(["status", "--data-dir", str(config.data_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert status["device_id"] == "dev-term" and status["connected"] is False
    assert cli_main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 2


def test_offline_telemetry_is_kept_and_flushed_after_reconnect(
    private_mosquitto: Callable[..., MosquittoBroker],
    config_factory: Callable[..., AgentConfig],
    agent_factory: Callable[..., Agent],
    kit: ReleaseKit,
    tmp_path: Path,
) -> None:
    store = tmp_path / "mq-data"
    store.mkdir()
    broker = private_mosquitto(["persistence true", f"persistence_location {store}/"])
    settings = MqttSettings(url=broker.url, reconnect_min_s=0.2, reconnect_max_s=1.0)
    # A persistent session: the observer gets what was published while it reconnects.
    obs = Observer(
        settings,
        kit.topics,
        "dev-off",
        client_id=f"obs-{uuid.uuid4().hex[:6]}",
        clean_session=False,
    )
    obs.start()
    try:
        agent = agent_factory(
            config_factory("dev-off", mqtt=settings.model_dump(), heartbeat_interval_s=0.2)
        )
        obs.wait_for(lambda: len(obs.heartbeats()) >= 2)
        broker.stop()
        deadline = time.monotonic() + 10
        while agent.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not agent.connected
        telemetry = agent.telemetry
        assert telemetry is not None
        while len(telemetry.outbox) < 8:  # heartbeats pile up on disk
            time.sleep(0.05)
        telemetry.event("install_failed", model="digits", version=9, reason="download_failed")
        queued_seq = agent.status().telemetry_queued
        assert queued_seq >= 9
        broker.start()
        obs.wait_event(kind="install_failed", version=9, timeout=30)
        last = max(h.seq for h in obs.heartbeats())
        seqs = {h.seq for h in obs.heartbeats()}
        assert seqs >= set(range(last + 1)), (
            f"lost heartbeats: {sorted(set(range(last + 1)) - seqs)}"
        )
        assert agent.status().telemetry_dropped == 0
    finally:
        obs.close()


def test_telemetry_beyond_the_bound_is_dropped_and_counted(
    private_mosquitto: Callable[..., MosquittoBroker],
    config_factory: Callable[..., AgentConfig],
    agent_factory: Callable[..., Agent],
    kit: ReleaseKit,
) -> None:
    broker = private_mosquitto()
    settings = MqttSettings(url=broker.url, reconnect_min_s=0.2, reconnect_max_s=1.0)
    agent = agent_factory(
        config_factory(
            "dev-drop", mqtt=settings.model_dump(), heartbeat_interval_s=0.1, telemetry_buffer_max=3
        )
    )
    assert agent.transport is not None and agent.transport.wait_connected(10)
    broker.stop()
    telemetry = agent.telemetry
    assert telemetry is not None
    while telemetry.dropped < 3:
        time.sleep(0.05)
    assert len(telemetry.outbox) == 3
    broker.start()
    obs = Observer(settings, kit.topics, "dev-drop").start()
    try:
        hb = obs.wait_for(
            lambda: [h for h in obs.heartbeats() if h.telemetry_dropped >= 3], timeout=30
        )
        assert hb[0].telemetry_dropped >= 3
    finally:
        obs.close()


def test_heartbeat_reports_versions_and_counters(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    data = build_model(seed=1)
    artifact_server.add(data)
    publish(
        artifact_server._transport, kit.topics.release("digits", 1), kit.release("digits", 1, data)
    )
    assert agent.wait_for_version("digits", 1, timeout=20)
    import numpy as np

    x = np.zeros((1, 1, 8, 8), np.float32)
    for _ in range(20):
        agent.infer("digits", {"input": x}, budget_ms=1000)
    hbs = obs.wait_for(lambda: [h for h in obs.heartbeats() if h.requests >= 20])
    hb = hbs[-1]
    assert hb.models == {"digits": 1}
    assert hb.edge_requests >= 20 and hb.budgeted_requests >= 20 and hb.met_budget >= 20
    assert hb.latency_p50_ms > 0 and hb.latency_p99_ms >= hb.latency_p50_ms
    assert hb.memory_mb > 0 and hb.uptime_s > 0 and hb.errors == 0
    assert hb.met_budget_ratio == 1.0 and hb.offload_ratio == 0.0


def test_the_outbox_counts_its_rows_without_asking_sqlite_each_time(tmp_path: Path) -> None:
    """The count kept in memory follows inserts, drops beyond the bound and removals,
    and a reopened outbox starts from the rows on disk."""
    outbox = Outbox(tmp_path / "t.db", bound=3)
    for i in range(5):
        outbox.put("t", b"%d" % i)
    assert len(outbox) == 3 and outbox.dropped == 2
    rows = outbox.peek()
    assert [p for _, _, p in rows] == [b"2", b"3", b"4"]
    outbox.remove(rows[0][0])
    outbox.remove(rows[0][0])  # gone already: nothing more to count
    assert len(outbox) == 2
    outbox.close()
    again = Outbox(tmp_path / "t.db", bound=3)
    assert len(again) == 2 and again.dropped == 2
    again.close()
