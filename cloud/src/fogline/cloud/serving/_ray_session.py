"""Who owns Ray: connect for the cloud services, and undo exactly what was done.

Ray starts locally unless ``RAY_ADDRESS`` names a cluster. A local instance started here
is stopped with ``ray.shutdown()``, which ends every process it started, Serve's
controller and replicas included (the bridge has already drained by then). Serve is not
asked to shut down first: a signal sent to the whole process group (``kill -- -PGID``,
``timeout``, systemd's default ``KillMode``) stops Ray's GCS at the same moment, and any
Serve call would then wait a minute and abort the process. On a cluster others may use
Serve too, so there the services delete their own applications (if the GCS answers)
and merely disconnect.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray

from .._ray_backend import LOCAL_RAY_SYSTEM_CONFIG

__all__ = ["RaySession"]

log = logging.getLogger("fogline.cloud.serving")


@dataclass
class RaySession:
    started: bool  # this process called ray.init
    local: bool  # ... and that started a local instance only we use

    @classmethod
    def acquire(cls) -> RaySession:
        if ray.is_initialized():
            return cls(started=False, local=False)  # the caller's Ray: leave it alone
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
            log.info("connected to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
            return cls(started=True, local=False)
        # "local": never attach to some other cluster found on this machine.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            _system_config=LOCAL_RAY_SYSTEM_CONFIG,
        )
        log.info("started local Ray")
        return cls(started=True, local=True)

    def alive(self, timeout_s: float = 1.0) -> bool:
        """Whether the GCS still takes connections (never waits for Ray's own timeouts)."""
        if not ray.is_initialized():
            return False
        host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            return False

    @property
    def owns_serve(self) -> bool:
        """Serve lives and dies with this process's local Ray: nothing to delete."""
        return self.local

    def release(self) -> None:
        if self.started:
            ray.shutdown()
        self.started = self.local = False
