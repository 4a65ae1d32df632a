"""Fleet health: the device registry, the monitor that fills it from MQTT, the fleet
summary, Prometheus metrics, a web page and the ``fogline fleet`` CLI (in ``.cli``)."""

from ._config import FleetSettings, default_data_dir, load_fleet_settings
from ._metrics import FleetCollector, fleet_registry
from ._monitor import FleetMonitor, MonitorStats, RejectReason
from ._open import open_fleet_store
from ._postgres import PostgresFleetStore
from ._records import (
    DeviceRecord,
    DeviceStatus,
    EventRecord,
    OfflineReason,
    RecentWindow,
    Totals,
    apply_event,
    apply_heartbeat,
    apply_state,
    mark_offline,
)
from ._select import DeviceFilter
from ._sqlite import FLEET_DB_NAME, SqliteFleetStore
from ._store import MAX_EVENTS_PER_DEVICE, FleetStore, FoldingStore, Observed, Sweep
from ._summary import (
    AttentionItem,
    AttentionReason,
    AttentionThresholds,
    FleetSummary,
    ModelSummary,
    summarize,
)
from ._web import FleetWebServer, render_html

__all__ = [
    "FLEET_DB_NAME",
    "MAX_EVENTS_PER_DEVICE",
    "AttentionItem",
    "AttentionReason",
    "AttentionThresholds",
    "DeviceFilter",
    "DeviceRecord",
    "DeviceStatus",
    "EventRecord",
    "FleetCollector",
    "FleetMonitor",
    "FleetSettings",
    "FleetStore",
    "FleetSummary",
    "FleetWebServer",
    "FoldingStore",
    "ModelSummary",
    "MonitorStats",
    "Observed",
    "OfflineReason",
    "PostgresFleetStore",
    "RecentWindow",
    "RejectReason",
    "SqliteFleetStore",
    "Sweep",
    "Totals",
    "apply_event",
    "apply_heartbeat",
    "apply_state",
    "default_data_dir",
    "fleet_registry",
    "load_fleet_settings",
    "mark_offline",
    "open_fleet_store",
    "render_html",
    "summarize",
]
