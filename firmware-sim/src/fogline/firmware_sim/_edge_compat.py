"""Temporary guard for an edge bug that only shows with many agents in one process.

``fogline.edge._store.PartialArtifact.close`` closes its file descriptor again when
``discard()`` follows ``close()`` (``ReleaseManager._fetch`` does exactly that after a
successful download). With one agent per process the second ``os.close`` fails
harmlessly; with a fleet downloading at once, the number may already belong to another
agent's file, which then fails with EBADF and the install is lost. Until the edge makes
``close`` idempotent, :class:`SimulatedFleet` makes it so. Remove this module then.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["guard_partial_artifact_double_close"]

_lock = threading.Lock()


def guard_partial_artifact_double_close() -> None:
    from fogline.edge import _store

    cls: Any = _store.PartialArtifact
    with _lock:
        if getattr(cls, "_sim_close_guarded", False):
            return
        original = cls.close

        def close(self: Any) -> None:
            if getattr(self, "_sim_closed", False):
                return
            self._sim_closed = True
            original(self)

        cls.close = close
        cls._sim_close_guarded = True
