"""Cloud inference: ONNX models on Ray Serve, behind an MQTT bridge.

Only ``_deployment`` imports Ray; importing this package does not start it.
"""

from ._bridge import PROBE_INPUT, BridgeStats, InferenceBridge, ServedModel, ServeHandle
from ._deployment import (
    DeployedModel,
    OnnxModelDeployment,
    deploy_model,
    ensure_ray,
    shutdown_serving,
    undeploy,
)
from ._runner import InputSpec, OnnxRunner
from ._settings import AutoscalingSettings, ServingSettings, parse_serving_settings

__all__ = [
    "PROBE_INPUT",
    "AutoscalingSettings",
    "BridgeStats",
    "DeployedModel",
    "InferenceBridge",
    "InputSpec",
    "OnnxModelDeployment",
    "OnnxRunner",
    "ServeHandle",
    "ServedModel",
    "ServingSettings",
    "deploy_model",
    "ensure_ray",
    "parse_serving_settings",
    "shutdown_serving",
    "undeploy",
]
