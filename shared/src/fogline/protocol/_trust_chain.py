"""Rotating the cloud signing key: a chain of signed key sets that agents walk.

An agent starts out trusting the keys in its configuration (key set version 0). The
cloud publishes, retained, a :class:`TrustChain`: every :class:`KeySet` it has issued,
oldest first, each signed. The agent adopts a link, and from then on trusts exactly its
keys, when all of these hold:

- its version is above the version the agent trusts now (an older chain is a replay);
- a key the agent trusts now signed it (the authority to change trust);
- every key it lists that the agent does not trust yet signed it too (the cloud holds
  that key, and a mistyped key cannot lock a fleet out);
- no signature by a key it lists or the agent trusts is bad.

Links are taken in order, so an agent that missed rotations catches up in one message,
and an agent provisioned with the newest key skips the links it cannot check. Rotation
introduces a key beside the old one; retirement drops the old one, signed by the new.
This follows TUF's root rotation with a threshold of one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._codec import canonical_bytes
from ._errors import SignatureError
from ._messages import KeySet, KeySignature, SignedKeySet, TrustChain
from ._signing import PublicKey, SigningKey

__all__ = ["TrustAdvance", "TrustState", "advance_trust", "issue_key_set"]


@dataclass(frozen=True)
class TrustState:
    """The keys trusted now and the key set version they came from (0: configured)."""

    version: int
    keys: tuple[PublicKey, ...]

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self.keys]


@dataclass(frozen=True)
class TrustAdvance:
    """What walking a chain did: the resulting state, the versions adopted on the way,
    the links refused (version, reason) and whether the chain was older than the state."""

    state: TrustState
    adopted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    stale: bool = False


def issue_key_set(
    version: int, keys: Sequence[PublicKey], signers: Iterable[SigningKey]
) -> SignedKeySet:
    """Key set ``version`` listing ``keys``, signed by each of ``signers``."""
    key_set = KeySet(version=version, issued_at=time.time(), keys=[k.to_text() for k in keys])
    data = canonical_bytes(key_set)
    signatures = [KeySignature(key_id=s.key_id, signature=s.sign(data)) for s in signers]
    return SignedKeySet(key_set=key_set, signatures=signatures)


def _link_keys(link: SignedKeySet) -> tuple[PublicKey, ...]:
    keys = tuple(PublicKey.from_text(t) for t in link.key_set.keys)
    if len({k.key_id for k in keys}) != len(keys):
        raise SignatureError(f"key set {link.key_set.version} lists a key twice")
    return keys


def _check_link(state: TrustState, link: SignedKeySet) -> tuple[PublicKey, ...]:
    """The link's keys if ``state`` may adopt it; :class:`SignatureError` otherwise."""
    version = link.key_set.version
    keys = _link_keys(link)
    known = {k.key_id: k for k in (*state.keys, *keys)}
    trusted = {k.key_id for k in state.keys}
    data = canonical_bytes(link.key_set)
    signed_by: set[str] = set()
    for sig in link.signatures:
        key = known.get(sig.key_id)
        if key is None:
            continue  # a signer neither side knows proves nothing either way
        key.verify(sig.signature, data)  # a bad signature by a known key refuses the link
        signed_by.add(sig.key_id)
    if not signed_by & trusted:
        raise SignatureError(f"key set {version} is not signed by a key this agent trusts")
    unsigned = [k.key_id for k in keys if k.key_id not in trusted and k.key_id not in signed_by]
    if unsigned:
        raise SignatureError(f"key set {version} adds keys that did not sign it: {unsigned}")
    return keys


def advance_trust(state: TrustState, chain: TrustChain) -> TrustAdvance:
    """Walk ``chain`` from ``state``: see the module docstring for the rules.

    Raises :class:`SignatureError` if the links' versions do not strictly increase."""
    versions = [link.key_set.version for link in chain.links]
    if any(b <= a for a, b in itertools.pairwise(versions)):
        raise SignatureError(f"trust chain versions must increase, got {versions}")
    if versions[-1] < state.version:
        return TrustAdvance(state, stale=True)
    adopted: list[int] = []
    refused: list[tuple[int, str]] = []
    for link in chain.links:
        version = link.key_set.version
        if version <= state.version:
            continue
        try:
            keys = _check_link(state, link)
        except SignatureError as exc:
            refused.append((version, exc.message))
            continue
        state = TrustState(version, keys)
        adopted.append(version)
    return TrustAdvance(state, adopted, refused)
