"""Fogline cloud tier: training on Ray, ONNX export, gated quantization, the model
registry, signed releases and rollbacks, rollout tracking, the artifact service and the
``fogline`` CLI.

Importing this package does not import Ray or torch; the functions that need them
import them when called.
"""

from ._artifacts import ArtifactService
from ._config import (
    DEFAULT_DEVICE_CLASSES,
    CloudSettings,
    DeviceClass,
    ServeConfig,
    load_settings,
)
from ._gate import BASELINE, GateDecision, VariantMeasurement, choose_variants
from ._keyring import KeyRing, KeySetChange
from ._manifest import build_desired, build_manifest, format_scope, parse_scope
from ._pipeline import PipelineResult, import_model, run_pipeline
from ._publisher import (
    PublishResult,
    TrustPublishResult,
    load_signing_key,
    publish_release,
    publish_trust,
)
from ._registry import DesiredRecord, ModelRecord, Registry, VariantRecord, parse_model_ref
from ._rollout import DeviceRollout, RolloutStatus, RolloutTracker, RolloutWatch
from ._store import ArtifactStore

__all__ = [
    "BASELINE",
    "DEFAULT_DEVICE_CLASSES",
    "ArtifactService",
    "ArtifactStore",
    "CloudSettings",
    "DesiredRecord",
    "DeviceClass",
    "DeviceRollout",
    "GateDecision",
    "KeyRing",
    "KeySetChange",
    "ModelRecord",
    "PipelineResult",
    "PublishResult",
    "Registry",
    "RolloutStatus",
    "RolloutTracker",
    "RolloutWatch",
    "ServeConfig",
    "TrustPublishResult",
    "VariantMeasurement",
    "VariantRecord",
    "build_desired",
    "build_manifest",
    "choose_variants",
    "format_scope",
    "import_model",
    "load_settings",
    "load_signing_key",
    "parse_model_ref",
    "parse_scope",
    "publish_release",
    "publish_trust",
    "run_pipeline",
]
