"""Turn pydantic validation and TOML errors into one :class:`ConfigError` naming the field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fogline.protocol import ConfigError

__all__ = ["config_error", "load_toml", "validate_model"]

M = TypeVar("M", bound=BaseModel)


def config_error(exc: ValidationError, source: str) -> ConfigError:
    """The first problem of ``exc`` as a :class:`ConfigError`, with its dotted field path."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "<root>"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return ConfigError(f"{source}: field {field!r}: {first['msg']}{suffix}")


def validate_model(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source) from None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
