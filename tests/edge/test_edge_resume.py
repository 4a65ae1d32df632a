"""Kill and resume: an agent SIGKILLed halfway through a download resumes from the
chunks it already has after a restart, and installs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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

from fogline.edge import AgentConfig

CHUNK = 2048


def _done_chunks(record: Path) -> set[int]:
    if not record.exists():
        return set()
    # "index" or "index sha256" per line
    lines = [line.split(" ")[0] for line in record.read_text().split("\n")]
    return {int(index) for index in lines if index.isdigit()}


def test_sigkill_mid_download_resumes_without_refetching_finished_chunks(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    config_factory: Callable[..., AgentConfig],
    observer_factory: Callable[..., Observer],
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    data = build_model(seed=7, channels=24)  # ~50 KB: a few dozen chunks
    sha = artifact_server.add(data)
    chunks = (len(data) + CHUNK - 1) // CHUNK
    artifact_server.delay_s = 0.05  # slow enough to kill it halfway
    obs = observer_factory("dev-resume")
    config = config_factory(
        "dev-resume", delivery={"window": 2, "chunk_timeout_s": 3.0, "chunk_retries": 5}
    )
    record = config.data_dir / "downloads" / f"{sha}.chunks"

    first = spawn_agent(config, tmp_path / "agent.toml", processes)
    read_ready(first)
    publish(
        artifact_server._transport,
        kit.topics.release("digits", 1),
        kit.release("digits", 1, data, chunk_size=CHUNK),
    )
    deadline = time.monotonic() + 30
    while len(_done_chunks(record)) < chunks // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    done = _done_chunks(record)
    assert 0 < len(done) < chunks, f"kill came too late or too early: {len(done)}/{chunks}"
    assert not obs.events(kind="install_succeeded")

    artifact_server.delay_s = 0.0
    second = spawn_agent(config, tmp_path / "agent.toml", processes)
    read_ready(second)
    obs.wait_event(kind="install_succeeded", model="digits", version=1, timeout=60)
    for index in done:
        assert artifact_server.requests[(sha, index * CHUNK)] == 1, f"chunk {index} fetched again"
    assert all(artifact_server.requests[(sha, i * CHUNK)] >= 1 for i in range(chunks))
    # Finished: the partial download is gone, the model is installed.
    assert not record.exists()
    assert list((config.data_dir / "models" / "digits").glob("1-*.onnx"))
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0
