"""Verified delivery: a signed release is downloaded, verified, installed and served;
bad releases are rejected with an event while the old model keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _release_kit import (
    ArtifactServer,
    Observer,
    ReleaseKit,
    build_model,
    publish,
    sample_input,
)

from fogline.edge import Agent
from fogline.protocol import (
    Heartbeat,
    InferenceInputError,
    SigningKey,
    Topics,
    UnknownModelError,
)


def _install(kit: ReleaseKit, server: ArtifactServer, version: int, seed: int, **kw: Any) -> bytes:
    data = build_model(seed=seed)
    server.add(data)
    signed = kit.release("digits", version, data, **kw)
    publish(server._transport, kit.topics.release("digits", version), signed)
    return data


def test_happy_path_downloads_installs_serves_and_reports(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    with pytest.raises(UnknownModelError):
        agent.infer("digits", {"input": sample_input()})
    _install(kit, artifact_server, 1, seed=0)
    assert agent.wait_for_version("digits", 1, timeout=20)
    result = agent.infer("digits", {"input": sample_input()})
    assert result.version == 1 and result.where == "edge" and result.model == "digits"
    assert result.outputs["logits"].shape == (1, 10)
    assert result.met_budget is None and not result.late
    obs.wait_event(kind="install_succeeded", model="digits", version=1)
    obs.wait_for(lambda: [h for h in obs.heartbeats() if h.models.get("digits") == 1 and h.requests >= 1])
    with pytest.raises(InferenceInputError):
        agent.infer("digits", {"input": sample_input().astype(np.float64)})
    assert agent.status().models["digits"].version == 1
