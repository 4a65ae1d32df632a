"""Fogline edge agent: verified model delivery, hot-swapped ONNX Runtime inference, an
Open Inference Protocol (v2) HTTP API, heartbeats and a last will.

Everything public is re-exported here; the private modules may change.
"""

from ._agent import Agent, AgentStatus, InferenceResult, ModelStatus
from ._capacity import Admission, CapacitySnapshot
from ._config import (
    AgentConfig,
    CapacityConfig,
    DeliveryConfig,
    HttpConfig,
    RoutingConfig,
    load_config,
)
from ._runtime import LoadedModel, ModelSlot, SessionCache
from ._store import InstalledModel, ModelStore

__all__ = [
    "Admission",
    "Agent",
    "AgentConfig",
    "AgentStatus",
    "CapacityConfig",
    "CapacitySnapshot",
    "DeliveryConfig",
    "HttpConfig",
    "InferenceResult",
    "InstalledModel",
    "LoadedModel",
    "ModelSlot",
    "ModelStatus",
    "ModelStore",
    "RoutingConfig",
    "SessionCache",
    "load_config",
]
