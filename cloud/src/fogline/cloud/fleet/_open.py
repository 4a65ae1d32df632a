"""Open the fleet store the settings name: PostgreSQL at ``store_url``, else SQLite."""

from __future__ import annotations

from ._config import FleetSettings
from ._postgres import PostgresFleetStore
from ._sqlite import SqliteFleetStore
from ._store import FleetStore

__all__ = ["open_fleet_store"]


def open_fleet_store(settings: FleetSettings, *, readonly: bool = False) -> FleetStore:
    """Raises :class:`~fogline.protocol.FleetError` if the store cannot be opened."""
    if settings.store_url is not None:
        return PostgresFleetStore(settings.store_url.get_secret_value(), readonly=readonly)
    return SqliteFleetStore(settings.store_path, readonly=readonly)
