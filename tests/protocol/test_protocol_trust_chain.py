"""Key rotation: walking a chain of signed key sets. Each attack asserts that the trusted
state did not move (the python-tuf way), and each legitimate path that it did."""

from __future__ import annotations

import pytest

from fogline.protocol import (
    DecodeError,
    KeySet,
    KeySignature,
    PublicKey,
    SignatureError,
    SignedKeySet,
    SigningKey,
    TrustChain,
    TrustState,
    advance_trust,
    canonical_bytes,
    decode,
    encode,
    issue_key_set,
)


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(4)]


def pub(*signing: SigningKey) -> list[PublicKey]:
    return [k.public_key for k in signing]


def start(*signing: SigningKey, version: int = 0) -> TrustState:
    return TrustState(version, tuple(pub(*signing)))


def rotation_chain(k: list[SigningKey]) -> TrustChain:
    """k0 -> {k0, k1} -> {k1} -> {k1, k2} -> {k2}: two rotations, each then retired."""
    return TrustChain(
        links=[
            issue_key_set(1, pub(k[0], k[1]), [k[0], k[1]]),
            issue_key_set(2, pub(k[1]), [k[1]]),
            issue_key_set(3, pub(k[1], k[2]), [k[1], k[2]]),
            issue_key_set(4, pub(k[2]), [k[2]]),
        ]
    )


def test_an_agent_on_the_first_key_walks_every_rotation(keys: list[SigningKey]) -> None:
    result = advance_trust(start(keys[0]), rotation_chain(keys))
    assert result.adopted == [1, 2, 3, 4] and result.refused == [] and not result.stale
    assert result.state == TrustState(4, (keys[2].public_key,))


def test_an_agent_part_way_takes_only_the_newer_links(keys: list[SigningKey]) -> None:
    result = advance_trust(start(keys[1], version=2), rotation_chain(keys))
    assert result.adopted == [3, 4] and result.state.key_ids == [keys[2].key_id]


def test_an_agent_provisioned_with_the_newest_key_skips_what_it_cannot_check(
    keys: list[SigningKey],
) -> None:
    result = advance_trust(start(keys[2]), rotation_chain(keys))
    assert result.adopted == [3, 4]
    assert [v for v, _ in result.refused] == [1, 2]
    assert result.state.version == 4


def test_the_chain_round_trips_the_codec(keys: list[SigningKey]) -> None:
    chain = rotation_chain(keys)
    assert decode(encode(chain), TrustChain) == chain


def test_an_older_chain_is_stale_and_moves_nothing(keys: list[SigningKey]) -> None:
    state = start(keys[2], version=4)
    old = TrustChain(links=rotation_chain(keys).links[:2])
    result = advance_trust(state, old)
    assert result.stale and result.state == state and result.adopted == []


def test_the_same_chain_twice_moves_nothing(keys: list[SigningKey]) -> None:
    chain = rotation_chain(keys)
    first = advance_trust(start(keys[0]), chain)
    again = advance_trust(first.state, chain)
    assert again.state == first.state and again.adopted == [] and not again.stale


def test_a_set_signed_only_by_an_untrusted_key_is_refused(keys: list[SigningKey]) -> None:
    state = start(keys[0])
    forged = TrustChain(links=[issue_key_set(1, pub(keys[3]), [keys[3]])])
    result = advance_trust(state, forged)
    assert result.state == state and result.adopted == []
    assert result.refused and "not signed by a key this agent trusts" in result.refused[0][1]


def test_a_new_key_that_did_not_sign_is_refused(keys: list[SigningKey]) -> None:
    # Only the trusted key signed: a typo or a key the cloud does not hold.
    state = start(keys[0])
    chain = TrustChain(links=[issue_key_set(1, pub(keys[0], keys[1]), [keys[0]])])
    result = advance_trust(state, chain)
    assert result.state == state
    assert keys[1].key_id in result.refused[0][1]


def test_a_tampered_key_list_is_refused(keys: list[SigningKey]) -> None:
    state = start(keys[0])
    link = issue_key_set(1, pub(keys[0], keys[1]), [keys[0], keys[1]])
    # Swap the new key for an attacker's after signing; the signatures stay.
    body = link.key_set.model_copy(update={"keys": [k.to_text() for k in pub(keys[0], keys[3])]})
    tampered = link.model_copy(update={"key_set": body})
    result = advance_trust(state, TrustChain(links=[tampered]))
    assert result.state == state and result.adopted == []


def test_a_bad_signature_by_a_known_key_refuses_the_link(keys: list[SigningKey]) -> None:
    state = start(keys[0])
    good = issue_key_set(1, pub(keys[0], keys[1]), [keys[0], keys[1]])
    bad = KeySignature(key_id=keys[1].key_id, signature=bytes(64))
    link = good.model_copy(update={"signatures": [good.signatures[0], bad]})
    result = advance_trust(state, TrustChain(links=[link]))
    assert result.state == state and "does not verify" in result.refused[0][1]


def test_a_signature_by_a_stranger_is_ignored(keys: list[SigningKey]) -> None:
    link = issue_key_set(1, pub(keys[0], keys[1]), [keys[0], keys[1]])
    noise = KeySignature(key_id=keys[3].key_id, signature=bytes(64))
    link = link.model_copy(update={"signatures": [*link.signatures, noise]})
    result = advance_trust(start(keys[0]), TrustChain(links=[link]))
    assert result.adopted == [1]


def test_a_link_listing_a_key_twice_is_refused(keys: list[SigningKey]) -> None:
    link = issue_key_set(1, pub(keys[0], keys[0]), [keys[0]])
    result = advance_trust(start(keys[0]), TrustChain(links=[link]))
    assert result.adopted == [] and "twice" in result.refused[0][1]


def test_a_refused_link_does_not_stop_a_later_one_the_agent_can_check(
    keys: list[SigningKey],
) -> None:
    forged = issue_key_set(1, pub(keys[3]), [keys[3]])
    real = issue_key_set(2, pub(keys[0], keys[1]), [keys[0], keys[1]])
    result = advance_trust(start(keys[0]), TrustChain(links=[forged, real]))
    assert result.adopted == [2] and [v for v, _ in result.refused] == [1]


@pytest.mark.parametrize("versions", [[2, 1], [1, 1]])
def test_versions_must_increase(keys: list[SigningKey], versions: list[int]) -> None:
    links = [issue_key_set(v, pub(keys[0]), [keys[0]]) for v in versions]
    with pytest.raises(SignatureError, match="must increase"):
        advance_trust(start(keys[0]), TrustChain(links=links))


def test_signatures_cover_canonical_bytes_of_the_key_set(keys: list[SigningKey]) -> None:
    link = issue_key_set(1, pub(keys[0]), [keys[0]])
    keys[0].public_key.verify(link.signatures[0].signature, canonical_bytes(link.key_set))


@pytest.mark.parametrize(
    "text",
    ["ed25519:", "rsa:AAAA", "ed25519:" + "A" * 44, "ed25519:" + "A" * 43 + "=" + "\n"],
)
def test_a_key_set_with_a_malformed_key_does_not_decode(text: str) -> None:
    with pytest.raises(ValueError):
        KeySet(version=1, issued_at=0.0, keys=[text])


def test_a_malformed_chain_is_a_decode_error(keys: list[SigningKey]) -> None:
    link = issue_key_set(1, pub(keys[0]), [keys[0]])
    for bad in (
        encode(SignedKeySet(key_set=link.key_set, signatures=link.signatures)),  # not a chain
        b"\x93\x01\x02",
        b"",
    ):
        with pytest.raises(DecodeError):
            decode(bad, TrustChain)
