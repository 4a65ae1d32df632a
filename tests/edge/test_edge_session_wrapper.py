"""A session cache may hand the agent a wrapper around an ONNX Runtime session (the
firmware simulator's slow devices do). The agent must call the wrapper's ``run``, not
reach past it to the inner session's C++ binding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _release_kit import ArtifactServer, ReleaseKit, build_model, publish, sample_input

from fogline.edge import Agent, AgentConfig, SessionCache
from fogline.firmware_sim import SlowSessionCache
from fogline.firmware_sim import _device as sim_device


class _CountingSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.runs = 0

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        self.runs += 1
        return self._session.run(output_names, input_feed, run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _CountingCache(SessionCache):
    def __init__(self) -> None:
        super().__init__()
        self.wrappers: list[_CountingSession] = []

    def get_or_load(self, sha256: str, threads: int, path: Path) -> Any:
        wrapper = _CountingSession(super().get_or_load(sha256, threads, path))
        self.wrappers.append(wrapper)
        return wrapper


def _serve_v1(kit: ReleaseKit, server: ArtifactServer) -> None:
    data = build_model(seed=1)
    server.add(data)
    publish(server._transport, kit.topics.release("digits", 1), kit.release("digits", 1, data))


def test_agent_runs_through_a_session_wrapper(
    kit: ReleaseKit, artifact_server: ArtifactServer, config_factory: Callable[..., AgentConfig]
) -> None:
    cache = _CountingCache()
    agent = Agent(config_factory("dev-wrap"), session_cache=cache)
    agent.start()
    try:
        _serve_v1(kit, artifact_server)
        assert agent.wait_for_version("digits", 1, timeout=20)
        wrapper = cache.wrappers[-1]
        before = wrapper.runs
        for seed in range(5):
            agent.infer("digits", {"input": sample_input(seed=seed)})
        assert wrapper.runs == before + 5
    finally:
        agent.stop()


def test_simulated_slow_device_runs_its_slow_session(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    config_factory: Callable[..., AgentConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs: list[int] = []
    original = sim_device._SlowSession.run

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sim_device._SlowSession, "run", counted)
    agent = Agent(config_factory("dev-slow"), session_cache=SlowSessionCache(SessionCache(), 3.0))
    agent.start()
    try:
        _serve_v1(kit, artifact_server)
        assert agent.wait_for_version("digits", 1, timeout=20)
        runs.clear()
        for seed in range(3):
            agent.infer("digits", {"input": sample_input(seed=seed)})
        assert len(runs) == 3
    finally:
        agent.stop()


def _spinning_entry(session: Any) -> str | None:
    try:
        value: str = session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning"
        )
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        return None
    return value


@pytest.mark.parametrize(("allow_spinning", "entry"), [(True, None), (False, "0")])
def test_session_cache_can_load_sessions_whose_workers_do_not_spin(
    tmp_path: Path, allow_spinning: bool, entry: str | None
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_model(seed=1))
    session = SessionCache(allow_spinning=allow_spinning).get_or_load("sha", 2, model)
    assert _spinning_entry(session) == entry
    assert session.run(None, {"input": sample_input()})[0].shape == (1, 10)
