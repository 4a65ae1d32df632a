"""An agent's trusted keys: the configured ones, advanced by the fleet's trust chain.

On real Mosquitto with real agents: a rotation adopted and reported, a release signed by
a key the agent learns only afterwards installed once the chain arrives, forged, stale
and malformed chains refused with an event while nothing moves, and ``trust.json``
surviving a restart (or, when corrupt, falling back to the configured keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from _release_kit import ArtifactServer, Observer, ReleaseKit, build_model, publish

from fogline.edge import Agent
from fogline.edge._status import STATUS_FILE
from fogline.edge._trust import TRUST_FILE, TrustKeeper
from fogline.edge.cli import main as cli_main
from fogline.protocol import SigningKey, TrustChain, encode, issue_key_set


def chain_to(kit: ReleaseKit, new: SigningKey, *, retire: bool = False) -> TrustChain:
    links = [issue_key_set(1, [kit.key.public_key, new.public_key], [kit.key, new])]
    if retire:
        links.append(issue_key_set(2, [new.public_key], [new]))
    return TrustChain(links=links)


def test_a_rotation_is_adopted_persisted_and_reported(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    assert agent.key_set_version == 0 and agent.trusted_key_ids == [kit.key.key_id]
    new = SigningKey.generate()
    pub = artifact_server._transport

    # Signed by a key the agent does not know yet: kept, and installed once it does.
    data = build_model(seed=4)
    artifact_server.add(data)
    publish(pub, kit.topics.release("digits", 1), kit.release("digits", 1, data, key=new))
    obs.wait_event(kind="release_rejected", reason="unknown_key", version=1)
    publish(pub, kit.topics.fleet_keys(), chain_to(kit, new, retire=True))
    assert agent.wait_for_version("digits", 1, timeout=20)

    assert agent.key_set_version == 2 and agent.trusted_key_ids == [new.key_id]
    assert agent.status().key_set_version == 2
    event = obs.wait_event(kind="keys_updated")
    assert "key set 2" in event.detail and new.key_id in event.detail
    obs.wait_for(lambda: [s for s in obs.states() if s.key_set_version == 2])
    saved = json.loads((tmp_path / "dev-1" / TRUST_FILE).read_text())
    assert saved["version"] == 2 and saved["keys"] == [new.public_key.to_text()]
    status_file = tmp_path / "dev-1" / STATUS_FILE
    obs.wait_for(lambda: '"key_set_version": 2' in status_file.read_text())
    capsys.readouterr()
    assert cli_main(["status", "--data-dir", str(tmp_path / "dev-1")]) == 0
    assert f"trusts     key set 2 ({new.key_id})" in capsys.readouterr().out

    # The old key signs nothing any more, even after a restart with the old config.
    agent.stop()
    again = agent_factory()
    assert again.key_set_version == 2 and again.trusted_key_ids == [new.key_id]
    publish(pub, kit.topics.release("digits", 2), kit.release("digits", 2, data))
    obs.wait_event(kind="release_rejected", reason="unknown_key", version=2)
    assert again.installed_version("digits") == 1


def test_forged_stale_and_malformed_chains_move_nothing(
    kit: ReleaseKit,
    artifact_server: ArtifactServer,
    agent_factory: Callable[..., Agent],
    observer_factory: Callable[..., Observer],
) -> None:
    obs = observer_factory()
    agent = agent_factory()
    pub = artifact_server._transport
    topic = kit.topics.fleet_keys()
    attacker = SigningKey.generate()

    forged = TrustChain(links=[issue_key_set(1, [attacker.public_key], [attacker])])
    publish(pub, topic, forged)
    event = obs.wait_event(kind="keys_rejected", reason="unverified")
    assert "not signed by a key this agent trusts" in event.detail
    assert agent.key_set_version == 0 and agent.trusted_key_ids == [kit.key.key_id]

    pub.publish(topic, b"\x93garbage", qos=1, retain=True, wait=True)
    obs.wait_event(kind="keys_rejected", reason="malformed")

    new = SigningKey.generate()
    publish(pub, topic, chain_to(kit, new, retire=True))
    obs.wait_for(lambda: agent.key_set_version == 2)
    publish(pub, topic, chain_to(kit, new))  # a replay of an older chain
    obs.wait_event(kind="keys_rejected", reason="stale")
    assert agent.key_set_version == 2 and agent.trusted_key_ids == [new.key_id]

    # The agent kept serving its API throughout.
    assert agent.status().key_set_version == 2


def test_a_corrupt_trust_file_falls_back_to_the_configured_keys(tmp_path: Path) -> None:
    configured = SigningKey.generate().public_key
    (tmp_path / TRUST_FILE).write_text("{not json")
    keeper = TrustKeeper(tmp_path, [configured.to_text()])
    assert keeper.version == 0 and keeper.key_ids == [configured.key_id]
    (tmp_path / TRUST_FILE).write_text(json.dumps({"version": 3, "keys": ["ed25519:bad"]}))
    assert TrustKeeper(tmp_path, [configured.to_text()]).version == 0


def test_an_agent_provisioned_with_the_newest_key_adopts_the_newest_set(tmp_path: Path) -> None:
    k0, k1, k2 = (SigningKey.generate() for _ in range(3))
    chain = TrustChain(
        links=[
            issue_key_set(1, [k0.public_key, k1.public_key], [k0, k1]),
            issue_key_set(2, [k1.public_key], [k1]),
            issue_key_set(3, [k1.public_key, k2.public_key], [k1, k2]),
            issue_key_set(4, [k2.public_key], [k2]),
        ]
    )
    keeper = TrustKeeper(tmp_path, [k2.public_key.to_text()])
    outcome = keeper.apply(encode(chain))
    # Links 1 and 2 are none of its business: skipped, and not reported as refusals.
    assert outcome.adopted and outcome.version == 4 and outcome.reason == ""
    assert keeper.key_ids == [k2.key_id]
