"""Fogline firmware simulator: hardware profiles, sensors, network faults and fleets of
real edge agents in one process."""

from ._control import CONTROL_FILE, ControlServer, send_control
from ._device import SimDevice, SlowSessionCache
from ._faults import FaultInjector, FaultRecord, FaultSource, FaultTarget
from ._fleet import FleetConfig, SimulatedFleet, allocate_profiles
from ._ledger import DeviceReport, DeviceSnapshot, FaultReport, FleetReport, Ledger
from ._link import LinkEmulator, LinkState
from ._profiles import (
    FlapProfile,
    HardwareProfile,
    LinkProfile,
    builtin_profiles,
    load_profiles,
    parse_profiles,
)
from ._scenario import (
    FaultKind,
    FaultSpec,
    Scenario,
    load_scenario,
    parse_scenario,
    resolve_targets,
)
from ._sensors import (
    BudgetDistribution,
    CorruptionKind,
    DigitSensor,
    FixedBudget,
    LognormalBudget,
    NoBudget,
    SensorConfig,
    SensorReading,
    UniformBudget,
    digits_dataset,
    parse_sensor_config,
)

__all__ = [
    "CONTROL_FILE",
    "BudgetDistribution",
    "ControlServer",
    "CorruptionKind",
    "DeviceReport",
    "DeviceSnapshot",
    "DigitSensor",
    "FaultInjector",
    "FaultKind",
    "FaultRecord",
    "FaultReport",
    "FaultSource",
    "FaultSpec",
    "FaultTarget",
    "FixedBudget",
    "FlapProfile",
    "FleetConfig",
    "FleetReport",
    "HardwareProfile",
    "Ledger",
    "LinkEmulator",
    "LinkProfile",
    "LinkState",
    "LognormalBudget",
    "NoBudget",
    "Scenario",
    "SensorConfig",
    "SensorReading",
    "SimDevice",
    "SimulatedFleet",
    "SlowSessionCache",
    "UniformBudget",
    "allocate_profiles",
    "builtin_profiles",
    "digits_dataset",
    "load_profiles",
    "load_scenario",
    "parse_profiles",
    "parse_scenario",
    "parse_sensor_config",
    "resolve_targets",
    "send_control",
]
