"""Cloud inference: ONNX models on Ray Serve, behind an MQTT bridge; and
:func:`start_cloud_services`, every long-running cloud service in one process.

Only ``_deployment`` and ``_ray_session`` import Ray; importing this package does not
start it.
"""

from ._batcher import ModelBatcher
from ._bridge import (
    PROBE_INPUT,
    BatchServeHandle,
    BridgeStats,
    InferenceBridge,
    ServedModel,
    ServeHandle,
)
from ._deployment import (
    LOCAL_RAY_SYSTEM_CONFIG,
    DeployedModel,
    OnnxModelDeployment,
    ServeModelHandle,
    deploy_model,
    ensure_ray,
    shutdown_serving,
    undeploy,
)
from ._follow import ReleaseFollower
from ._from_registry import (
    SERVED_VARIANT,
    deploy_record,
    parse_served_refs,
    resolve_served,
    serve_models,
    serving_settings_for,
)
from ._ray_session import RaySession
from ._runner import InputSpec, OnnxRunner
from ._services import CloudServices, Service, check_serve_models, start_cloud_services
from ._settings import AutoscalingSettings, ServingSettings, parse_serving_settings

__all__ = [
    "LOCAL_RAY_SYSTEM_CONFIG",
    "PROBE_INPUT",
    "SERVED_VARIANT",
    "AutoscalingSettings",
    "BatchServeHandle",
    "BridgeStats",
    "CloudServices",
    "DeployedModel",
    "InferenceBridge",
    "InputSpec",
    "ModelBatcher",
    "OnnxModelDeployment",
    "OnnxRunner",
    "RaySession",
    "ReleaseFollower",
    "ServeHandle",
    "ServeModelHandle",
    "ServedModel",
    "Service",
    "ServingSettings",
    "check_serve_models",
    "deploy_model",
    "deploy_record",
    "ensure_ray",
    "parse_served_refs",
    "parse_serving_settings",
    "resolve_served",
    "serve_models",
    "serving_settings_for",
    "shutdown_serving",
    "start_cloud_services",
    "undeploy",
]
