"""Ray behind a small interface: start or join a cluster, and map a function over
inputs as parallel Ray tasks. Only this module and ``training/_ray_train.py`` import ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import ray

from fogline.protocol import TrainingError

__all__ = ["cluster_cpus", "map_tasks", "ray_runtime", "task_cpus"]

log = logging.getLogger("fogline.cloud.ray")

T = TypeVar("T")
R = TypeVar("R")


LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}
"""For every local Ray Fogline starts. Ray runs its workers at nice 15 by default, so a
Serve replica or a measurement task gets a few percent of a core against any normal
process (the bridge, an edge agent, a neighbour); on the 2-core bench machine that alone
turned most cloud requests into timeouts. Ray's own job manager uses niceness 0 too."""


@contextmanager
def ray_runtime() -> Iterator[None]:
    """Use the running Ray, else join ``$RAY_ADDRESS``, else start a local one. Shuts down
    only what it started."""
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG,
        )
    except Exception as exc:
        where = address or "a local instance"
        raise TrainingError(f"cannot start Ray ({where}): {type(exc).__name__}: {exc}") from None
    log.info("started Ray (%s)", address or "local")
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]


def task_cpus(wanted: int) -> float:
    """CPUs to reserve per task: ``wanted`` capped by the cluster, and by what is free
    right now (other work, e.g. Serve replicas, may hold some), so tasks never wait for
    resources that will not come. At least half a CPU."""
    cpus = float(min(wanted, cluster_cpus()))
    free = float(ray.available_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
    if free < cpus:
        cpus = max(0.5, int(free * 2) / 2)
    return cpus


def map_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    num_cpus: float = 1,
    on_done: Callable[[R], None] | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` as parallel Ray tasks, results in input order.

    ``on_done`` is called in completion order (for progress bars)."""
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(fn)
    refs: list[Any] = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                value = ray.get(ref)
                results[index[ref]] = value
                if on_done is not None:
                    on_done(value)
    except ray.exceptions.RayTaskError as exc:
        for ref in pending:
            ray.cancel(ref)
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, TrainingError):
            raise cause from None
        raise TrainingError(f"a Ray task failed: {type(cause).__name__}: {cause}") from None
    return results
