"""Fogline edge agent: verified model delivery, hot-swapped ONNX Runtime inference, a
hybrid router (edge or cloud per request, by latency budget, capacity and confidence),
an Open Inference Protocol (v2) HTTP API, heartbeats and a last will.

Everything public is re-exported here; the private modules may change.
"""

from ._agent import Agent, AgentStatus, InferenceResult, ModelStatus
from ._breaker import BreakerSnapshot, CircuitBreaker
from ._capacity import Admission, CapacitySnapshot
from ._cloud_client import PROBE_INPUT, CloudClient, CloudClientStats
from ._config import (
    AgentConfig,
    CapacityConfig,
    DeliveryConfig,
    HttpConfig,
    RoutingConfig,
    load_config,
)
from ._routing import (
    CloudState,
    LoadHints,
    LocalState,
    RouteDecision,
    RoutedResult,
    Router,
    RoutingPolicy,
    RoutingSettings,
    RoutingStats,
    decide,
)
from ._runtime import LoadedModel, ModelSlot, SessionCache
from ._store import InstalledModel, ModelStore

__all__ = [
    "PROBE_INPUT",
    "Admission",
    "Agent",
    "AgentConfig",
    "AgentStatus",
    "BreakerSnapshot",
    "CapacityConfig",
    "CapacitySnapshot",
    "CircuitBreaker",
    "CloudClient",
    "CloudClientStats",
    "CloudState",
    "DeliveryConfig",
    "HttpConfig",
    "InferenceResult",
    "InstalledModel",
    "LoadHints",
    "LoadedModel",
    "LocalState",
    "ModelSlot",
    "ModelStatus",
    "ModelStore",
    "RouteDecision",
    "RoutedResult",
    "Router",
    "RoutingConfig",
    "RoutingPolicy",
    "RoutingSettings",
    "RoutingStats",
    "SessionCache",
    "decide",
    "load_config",
]
