"""The simulator's names for the shared settings helpers in :mod:`fogline.protocol`
(one :class:`ConfigError` naming the field, the same wording in every Fogline tool)."""

from __future__ import annotations

from fogline.protocol import config_error, read_toml, validate_settings

__all__ = ["config_error", "load_toml", "validate_model"]

# The scenario, profile, sensor and fleet modules import these names.
load_toml = read_toml
validate_model = validate_settings
