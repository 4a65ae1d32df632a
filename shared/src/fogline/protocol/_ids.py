"""Validation of the ids that become MQTT topic levels.

Device ids, model names and group names each fill exactly one topic level, so they must
not contain the MQTT wildcards ``+`` and ``#``, the level separator ``/``, NUL, or
anything that a pattern ACL could misread. We accept a conservative alphabet instead of
rejecting a list of known-bad characters.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from ._errors import InvalidIdError

__all__ = ["MAX_ID_LENGTH", "Identifier", "validate_id"]

MAX_ID_LENGTH = 64
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_id(value: str, kind: str = "id") -> str:
    """Return ``value`` unchanged if it is a valid id, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidIdError(f"{kind} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(f"{kind} is {len(value)} characters long; at most {MAX_ID_LENGTH}")
    if not _ID_PATTERN.fullmatch(value):
        raise InvalidIdError(
            f"{kind} {value!r} may only contain letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value


def _pydantic_id(value: str) -> str:
    try:
        return validate_id(value)
    except InvalidIdError as exc:
        # pydantic turns ValueError into a ValidationError with this text.
        raise ValueError(exc.message) from None


Identifier = Annotated[str, AfterValidator(_pydantic_id)]
"""A ``str`` field that must be a valid id; use it in every message model."""
