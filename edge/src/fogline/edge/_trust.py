"""The cloud keys an agent trusts: its configured keys, then the fleet's trust chain.

The agent starts from ``trusted_keys`` in its configuration (key set version 0). Each
trust chain the cloud publishes is walked with
:func:`~fogline.protocol.advance_trust`; what is adopted is written to ``trust.json``
in the data directory before it is used, so after a restart the agent trusts what it
trusted before, never less and never an older set. Deleting ``trust.json`` returns the
agent to its configured keys.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fogline.protocol import (
    DecodeError,
    PublicKey,
    SignatureError,
    TrustChain,
    TrustState,
    TrustStore,
    advance_trust,
    decode,
)

from ._store import atomic_write

__all__ = ["TRUST_FILE", "TrustKeeper", "TrustOutcome"]

log = logging.getLogger("fogline.edge.trust")

TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class TrustOutcome:
    """What one trust chain message did. ``reason`` is set when it was refused, fully or
    in part (``malformed``, ``bad_chain``, ``stale``, ``unverified``)."""

    adopted: bool
    version: int
    reason: str = ""
    detail: str = ""


class TrustKeeper:
    """Holds the :class:`TrustStore` every verification on this agent uses, and moves it
    forward when a trust chain allows."""

    def __init__(self, data_dir: Path, configured: Sequence[str]) -> None:
        self._path = Path(data_dir) / TRUST_FILE
        self._lock = threading.Lock()
        configured_state = TrustState(0, tuple(PublicKey.from_text(t) for t in configured))
        self._state = self._load() or configured_state
        self.trust = TrustStore(self._state.keys)

    @property
    def version(self) -> int:
        return self._state.version

    @property
    def key_ids(self) -> list[str]:
        return self._state.key_ids

    def _load(self) -> TrustState | None:
        try:
            raw = json.loads(self._path.read_text())
            keys = tuple(PublicKey.from_text(t) for t in raw["keys"])
            state = TrustState(int(raw["version"]), keys)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, SignatureError) as exc:
            # Falling back to the configured keys is safe: the retained chain is walked
            # again from them, and nothing they do not sign is adopted.
            log.warning("%s is unreadable (%s); starting from the configured keys", self._path, exc)
            return None
        return state if state.version > 0 and state.keys else None

    def apply(self, payload: bytes) -> TrustOutcome:
        """Walk the trust chain in ``payload``; persist and adopt what it allows."""
        try:
            chain = decode(payload, TrustChain)
        except DecodeError as exc:
            return TrustOutcome(False, self.version, "malformed", exc.message)
        with self._lock:
            try:
                result = advance_trust(self._state, chain)
            except SignatureError as exc:
                return TrustOutcome(False, self._state.version, "bad_chain", exc.message)
            newest = chain.links[-1].key_set.version
            if result.stale:
                detail = f"chain ends at key set {newest}, this agent trusts {self._state.version}"
                return TrustOutcome(False, self._state.version, "stale", detail)
            if result.adopted:
                state = result.state
                data = {"version": state.version, "keys": [k.to_text() for k in state.keys]}
                atomic_write(self._path, json.dumps(data).encode())
                self._state = state
                self.trust.replace(state.keys)
        version = result.state.version
        if version < newest:
            # Refusals of links an agent could never check (it was provisioned with a
            # newer key) are noise; falling short of the newest set is not.
            detail = "; ".join(f"key set {v}: {why}" for v, why in result.refused[-3:])
            return TrustOutcome(bool(result.adopted), version, "unverified", detail)
        return TrustOutcome(bool(result.adopted), version)
