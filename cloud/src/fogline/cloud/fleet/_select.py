"""Which devices a listing shows: the filters of ``fogline fleet devices`` and of the web
server's ``/api/devices``, one definition for both."""

from __future__ import annotations

from dataclasses import dataclass

from fogline.protocol import ConfigError

from ._records import DeviceRecord

__all__ = ["DeviceFilter"]


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """Every given criterion must hold. ``model`` is a name, ``version`` (with a model)
    the version it must run."""

    offline: bool = False
    group: str | None = None
    device_class: str | None = None
    model: str | None = None
    version: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        offline: bool = False,
        group: str | None = None,
        device_class: str | None = None,
        model: str | None = None,
    ) -> DeviceFilter:
        """``model`` as ``NAME`` or ``NAME:VERSION``; anything else is a ConfigError."""
        if model is None:
            return cls(offline, group, device_class)
        name, _, version = model.partition(":")
        if not name or (version and not version.isdigit()) or model.endswith(":"):
            raise ConfigError(f"model filter {model!r} is not NAME or NAME:VERSION")
        return cls(offline, group, device_class, name, int(version) if version else None)

    def matches(self, record: DeviceRecord) -> bool:
        if self.offline and record.online:
            return False
        if self.group is not None and self.group not in record.groups:
            return False
        if self.device_class is not None and record.device_class != self.device_class:
            return False
        if self.model is not None:
            running = record.heartbeat.models if record.heartbeat is not None else {}
            if self.model not in running:
                return False
            if self.version is not None and running[self.model] != self.version:
                return False
        return True
