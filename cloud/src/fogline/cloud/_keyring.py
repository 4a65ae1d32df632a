"""The cloud's signing keys: the active key and the trust chain of every key set issued.

Files under ``<data_dir>/keys``:

- ``cloud-signing.pem``: the active key, which signs releases, desired states and key
  sets (created on first use);
- ``trust-chain.msgpack``: the :class:`~fogline.protocol.TrustChain`, absent until the
  first rotation (until then agents trust the active key from their configuration);
- ``next-signing.pem``: only between the steps of a rotation.

A rotation issues key set N+1 = the current keys plus a new one, signed by the active
and the new key, then makes the new key active. Retiring a key issues a set without it,
signed by the active key. Each step is written before the next starts, so a crash at
any point leaves either the old state or the new one (see :meth:`KeyRing._recover`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fogline.protocol import (
    MAX_CHUNK_SIZE,
    DecodeError,
    KeyRotationError,
    PublicKey,
    SignedKeySet,
    SigningKey,
    TrustChain,
    TrustState,
    TrustStore,
    decode,
    encode,
    issue_key_set,
)

__all__ = ["KeyRing", "KeySetChange"]

_MAX_KEYS = 16  # as many as a KeySet may list


@dataclass(frozen=True)
class KeySetChange:
    """A key set just issued: its link, and the key made active or retired."""

    link: SignedKeySet
    chain: TrustChain
    active_key_id: str
    retired_key_id: str | None = None

    @property
    def version(self) -> int:
        return self.link.key_set.version


class KeyRing:
    """The signing keys under ``<data_dir>/keys``."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / "keys"
        self._active_path = self.directory / "cloud-signing.pem"
        self._next_path = self.directory / "next-signing.pem"
        self._chain_path = self.directory / "trust-chain.msgpack"
        self._recover()

    # -- reading ------------------------------------------------------------------------
    @property
    def active(self) -> SigningKey:
        """The key that signs; created (0600) on first use."""
        return SigningKey.load_or_create(self._active_path)

    def chain(self) -> TrustChain | None:
        try:
            data = self._chain_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyRotationError(
                f"cannot read the trust chain {self._chain_path}: {exc}"
            ) from None
        try:
            return decode(data, TrustChain)
        except DecodeError as exc:
            raise KeyRotationError(
                f"the trust chain {self._chain_path} is corrupt: {exc}"
            ) from None

    def current(self) -> TrustState:
        """The key set agents are meant to trust: the chain's newest, else the active key
        alone (version 0, what agents are configured with)."""
        chain = self.chain()
        if chain is None:
            return TrustState(0, (self.active.public_key,))
        newest = chain.links[-1].key_set
        return TrustState(newest.version, tuple(PublicKey.from_text(t) for t in newest.keys))

    def trust(self) -> TrustStore:
        """What the cloud itself checks its retained messages with."""
        return TrustStore(self.current().keys)

    # -- changing -----------------------------------------------------------------------
    def rotate(self) -> KeySetChange:
        """Introduce a new key beside the current ones and make it the active key."""
        state, active = self.current(), self.active
        if len(state.keys) >= _MAX_KEYS:
            raise KeyRotationError(
                f"key set {state.version} already lists {len(state.keys)} keys; "
                "retire one before rotating again"
            )
        new = SigningKey.generate()
        link = issue_key_set(state.version + 1, (*state.keys, new.public_key), (active, new))
        new.save(self._next_path)  # 1: the new key exists before anything names it
        chain = self._append(link)  # 2: the set naming it is on disk
        self._next_path.replace(self._active_path)  # 3: it signs from now on
        return KeySetChange(link, chain, new.key_id)

    def retire(self, key_id: str) -> KeySetChange:
        """Issue a key set without ``key_id``, signed by the active key. The active key
        cannot be retired (rotate first), nor the last key."""
        state, active = self.current(), self.active
        if key_id not in state.key_ids:
            raise KeyRotationError(
                f"key {key_id} is not in key set {state.version} ({', '.join(state.key_ids)})"
            )
        if key_id == active.key_id:
            raise KeyRotationError(
                f"key {key_id} is the active signing key: rotate to a new key, then retire it"
            )
        keys = tuple(k for k in state.keys if k.key_id != key_id)
        link = issue_key_set(state.version + 1, keys, (active,))
        chain = self._append(link)
        return KeySetChange(link, chain, active.key_id, retired_key_id=key_id)

    def _append(self, link: SignedKeySet) -> TrustChain:
        chain = self.chain()
        links = [*(chain.links if chain is not None else ()), link]
        new_chain = TrustChain(links=links)
        data = encode(new_chain)
        if len(data) > MAX_CHUNK_SIZE:
            raise KeyRotationError("the trust chain has grown past 1 MiB; it cannot be published")
        tmp = self._chain_path.with_name(self._chain_path.name + ".tmp")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._chain_path)
        return new_chain

    def _recover(self) -> None:
        """Finish or undo a rotation a crash interrupted: a pending key that the newest
        key set names becomes active (step 3); one it does not name is discarded."""
        if not self._next_path.exists():
            return
        pending = SigningKey.load(self._next_path)
        chain = self.chain()
        named = chain is not None and pending.public_key.to_text() in chain.links[-1].key_set.keys
        if named:
            self._next_path.replace(self._active_path)
        else:
            self._next_path.unlink()
