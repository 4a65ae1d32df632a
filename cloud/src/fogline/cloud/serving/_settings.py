"""How one model is served: replicas or autoscaling, batching, threads. Pure pydantic."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fogline.protocol import ConfigError, Identifier

__all__ = ["AutoscalingSettings", "ServingSettings", "parse_serving_settings"]


class AutoscalingSettings(BaseModel):
    """Passed to Ray Serve's ``autoscaling_config``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: Annotated[int, Field(ge=0, le=1024)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1024)] = 4
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 8.0

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServingSettings(BaseModel):
    """One served model. Give ``num_replicas`` or ``autoscaling``, not both (neither:
    one replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Identifier
    version: Annotated[int, Field(ge=1)]
    num_replicas: Annotated[int, Field(ge=1, le=1024)] | None = None
    autoscaling: AutoscalingSettings | None = None
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    batch_wait_timeout_ms: Annotated[float, Field(ge=0, le=1000)] = 2.0
    max_ongoing_requests: Annotated[int, Field(ge=1, le=100_000)] = 64
    num_cpus: Annotated[float, Field(ge=0, le=256)] = 0.5
    intra_op_threads: Annotated[int, Field(ge=1, le=256)] = 1
    # The bridge's calls go to the replica over Serve's gRPC path, results by value
    # (see ServeModelHandle); False: Ray actor calls through the object store.
    by_value_calls: bool = True

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> Self:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size")
        return self

    @property
    def app_name(self) -> str:
        return f"fogline-{self.model}"

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "name": f"{self.model}-v{self.version}",
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


def parse_serving_settings(data: dict[str, Any]) -> ServingSettings:
    """Validate a ``[serve.<model>]``-like table; one clear :class:`ConfigError`."""
    try:
        return ServingSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(serving)"
        raise ConfigError(f"serving config field {where!r}: {err['msg']}") from None
