"""Who owns Ray: connect for the cloud services, and undo exactly what was done.

Ray starts locally unless ``RAY_ADDRESS`` names a cluster. Only a local instance started
here is torn down on release (Serve, then Ray); on a cluster others may use Serve too,
so there the services delete their own applications and merely disconnect.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray import serve

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
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        log.info("started local Ray")
        return cls(started=True, local=True)

    def release(self) -> None:
        if self.local:
            serve.shutdown()  # type: ignore[no-untyped-call]
        if self.started:
            ray.shutdown()
        self.started = self.local = False
