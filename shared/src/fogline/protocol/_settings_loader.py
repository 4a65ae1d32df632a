"""One way every Fogline tool loads its settings: a pydantic model fed from a TOML file,
then ``FOGLINE_*`` environment variables, then explicit overrides (CLI flags).

Precedence, lowest first: the model's defaults, the TOML file (or one table of it),
the environment, ``overrides``. Environment variables name a field path after the
prefix with ``__`` between levels (``FOGLINE_CAPACITY__MAX_IN_FLIGHT=4``); a value
starting with ``[`` or ``{`` is parsed as JSON (lists, tables), anything else goes to
pydantic as text, which converts numbers and booleans. Empty variables count as unset.
``aliases`` map whole variable names to field paths (``FOGLINE_BROKER_URL`` ->
``mqtt.url``); the canonical name wins when both are set.

Every problem is one :class:`ConfigError` that starts with where the bad value came
from (the file, ``$FOGLINE_...``, ``overrides``) and names the dotted field path.
"""

from __future__ import annotations

import copy
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from ._errors import ConfigError, TopicError
from ._topics import Topics

__all__ = ["TopicPrefix", "config_error", "load_settings", "read_toml", "validate_settings"]

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "FOGLINE_"
OVERRIDES = "overrides"
DEFAULTS = "defaults"

_Path = tuple[str, ...]


def _check_topic_prefix(value: str) -> str:
    try:
        Topics(value)
    except TopicError as exc:
        # pydantic reports a ValueError against the field; a TopicError would escape raw.
        raise ValueError(exc.message) from None
    return value


# The ``topic_prefix`` field every tool's settings have.
TopicPrefix = Annotated[str, AfterValidator(_check_topic_prefix)]


def config_error(exc: ValidationError, source: str) -> ConfigError:
    """The first problem of ``exc`` as a :class:`ConfigError`: ``source``, the dotted
    field path and pydantic's message, plus how many more problems there were."""
    return _error(exc, lambda _loc: source)


def validate_settings(model: type[M], data: Any, source: str) -> M:
    """``model.model_validate(data)``, any problem raised as :func:`config_error`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source) from None


def read_toml(path: Path | str) -> dict[str, Any]:
    """The parsed TOML file; a missing, unreadable or malformed file is a ConfigError."""
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(
    model: type[M],
    path: Path | str | None = None,
    *,
    section: str | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str = ENV_PREFIX,
    aliases: Mapping[str, _Path] | None = None,
    strict_env: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Build ``model`` from ``path`` (optional), ``env`` (default ``os.environ``) and
    ``overrides``; see the module docstring for the rules.

    ``section`` picks the file's table of that name when it has one (one file can
    configure several tools), else the whole file is used. Variables under
    ``env_prefix`` whose first level is not a field of ``model`` are ignored, since
    other tools share the prefix, unless ``strict_env`` (a prefix this model owns).
    ``None`` values in ``overrides`` mean "not given" (optional CLI flags).
    """
    data: dict[str, Any] = {}
    base = DEFAULTS
    if path is not None:
        data = read_toml(path)
        base = str(path)
        if section is not None and isinstance(data.get(section), dict):
            data = data[section]
            base = f"{path} [{section}]"
    file_data = data
    data = copy.deepcopy(file_data)  # _set writes into it
    origins: dict[_Path, str] = {}
    environ = os.environ if env is None else env
    for var, field, value in _env_values(model, environ, env_prefix, aliases or {}, strict_env):
        _set(data, origins, field, value, f"${var}")
    _set(data, origins, (), overrides or {}, OVERRIDES)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _error(exc, lambda loc: _source_of(loc, origins, file_data, base)) from None


def _env_values(
    model: type[BaseModel],
    env: Mapping[str, str],
    prefix: str,
    aliases: Mapping[str, _Path],
    strict: bool,
) -> list[tuple[str, _Path, Any]]:
    """``(variable, field path, value)`` in the order to apply them: aliases first, then
    canonical names, shorter paths (whole JSON tables) before the fields inside them."""
    fields = set(model.model_fields)
    found: list[tuple[int, int, str, _Path]] = []
    for name, raw in env.items():
        if raw == "":
            continue
        if name in aliases:
            found.append((0, len(aliases[name]), name, tuple(aliases[name])))
        elif name.startswith(prefix) and len(name) > len(prefix):
            path = tuple(p.lower() for p in name[len(prefix) :].split("__"))
            if path[0] in fields or (strict and path[0]):
                found.append((1, len(path), name, path))
    out = []
    for _, _, name, path in sorted(found):
        raw = env[name]
        value: Any = raw
        if raw.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"${name}: field {'.'.join(path)!r}: not valid JSON: {exc}"
                ) from None
        out.append((name, path, value))
    return out


def _set(
    data: dict[str, Any], origins: dict[_Path, str], path: _Path, value: Any, source: str
) -> None:
    """Put ``value`` at ``path`` in ``data`` (tables merge key by key, ``None`` is "not
    given"), noting in ``origins`` which source set each leaf."""
    if isinstance(value, Mapping):
        _table(data, path, source, replace=True)
        for key, item in value.items():
            if item is not None:
                _set(data, origins, (*path, str(key)), item, source)
        return
    _table(data, path[:-1], source, replace=False)[path[-1]] = value
    for old in [p for p in origins if p[: len(path)] == path]:
        del origins[old]
    origins[path] = source


def _table(data: dict[str, Any], path: _Path, source: str, *, replace: bool) -> dict[str, Any]:
    """The table at ``path``, created where missing. A value that is not a table in the
    way is an error, except at ``path`` itself when a whole table replaces it."""
    node = data
    for depth, part in enumerate(path, 1):
        child = node.get(part)
        if child is None or (replace and depth == len(path) and not isinstance(child, dict)):
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[:depth])
            raise ConfigError(f"{source}: field {where!r} is not a table, cannot set fields in it")
        node = child
    return node


def _source_of(
    loc: _Path, origins: Mapping[_Path, str], file_data: Mapping[str, Any], base: str
) -> str:
    """Where the value at ``loc`` came from: the source that set it (or a table holding
    it); for a whole table, every source that set something inside, and the file."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    inside = [s for p, s in origins.items() if p[: len(loc)] == loc]
    node: Any = file_data
    for part in loc:
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is not None or not inside:
        inside.append(base)
    return ", ".join(dict.fromkeys(inside))


def _error(exc: ValidationError, source_of: Callable[[_Path], str]) -> ConfigError:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    field = ".".join(loc) or "<root>"
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return ConfigError(f"{source_of(loc)}: field {field!r}: {first['msg']}{suffix}")
