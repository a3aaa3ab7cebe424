"""The store's one set of request checks and its one JSON policy.

Every check raises `InvalidArgument` whose message starts with the request field at fault
(`"<field>: <what is wrong>"`), so every RPC words the same fault the same way.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any, TypeVar

from cyclone.errors import InvalidArgument, NotFound
from cyclone.models.schema import validate_name
from cyclone.telemetry import valid_traceparent

T = TypeVar("T", bound=str)
R = TypeVar("R")


def found(value: R | None, missing: str) -> R:
    """`value`, or NOT_FOUND saying `missing` ("<field>: ... not found") when there is none."""
    if value is None:
        raise NotFound(missing)
    return value


def require(field: str, value: str) -> str:
    """`value`, or INVALID_ARGUMENT naming `field` when it is empty."""
    if not value:
        raise InvalidArgument(f"{field}: empty")
    return value


def name(field: str, value: str) -> str:
    """A model or version name as the repository and Envoy's cluster names take it."""
    try:
        return validate_name(field, value)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def one_of(field: str, value: T, allowed: Collection[T]) -> T:
    if value not in allowed:
        raise InvalidArgument(f"{field}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def positive(field: str, value: int) -> int:
    """An id: the store's ids start at 1."""
    if value <= 0:
        raise InvalidArgument(f"{field}: must be positive")
    return value


def not_negative(field: str, value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"{field}: must not be negative")
    return value


def limit(field: str, value: int, maximum: int, default: int) -> int:
    """A page or batch size: 0 means `default`, otherwise 1..maximum."""
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"{field}: must be between 1 and {maximum}")
    return value or default


def percent(field: str, value: float) -> float:
    """A traffic weight in [0, 100]."""
    if not 0 <= value <= 100:  # also refuses NaN
        raise InvalidArgument(f"{field}: must be between 0 and 100, got {value}")
    return value


def finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: must be finite, got {value}")
    return value


def finite_numbers(field: str, numbers: Mapping[str, float]) -> dict[str, float]:
    for key, value in numbers.items():
        finite(f"{field}[{key}]", value)
    return dict(numbers)


def not_negative_number(field: str, value: float) -> float:
    """A finite number >= 0 (a tolerance, a distance)."""
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{field}: must be a finite number >= 0, got {value}")
    return value


def traceparent(field: str, text: str) -> str:
    """A W3C traceparent, or nothing."""
    if text and not valid_traceparent(text):
        raise InvalidArgument(f"{field}: not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    return text


def check_window(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end: must be after start")


def parse_uuid7(value: str, field: str) -> uuid.UUID:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field}: {value!r} is not a UUID") from None
    if parsed.version != 7:
        raise InvalidArgument(f"{field}: {value!r} is not a time-ordered UUIDv7 prediction id")
    return parsed


# --- the JSON policy ---------------------------------------------------------------------------


def load_json(text: str | bytes, field: str, default: Any = None) -> Any:
    """The store's one JSON policy for what callers send: strict JSON that PostgreSQL's jsonb
    takes back after Python parsed it -- no NaN or Infinity, no number a double cannot hold
    (1e999 would be written back as Infinity), no NUL character; empty text is `default`."""
    if not text:
        return default
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None
    # Only an escape can put a NUL in valid JSON text, so most text skips the walk.
    escaped = b"\\u0000" in text if isinstance(text, bytes) else "\\u0000" in text
    if escaped and _has_nul(value):
        raise InvalidArgument(f"{field}: \\u0000 is not allowed (PostgreSQL refuses it)")
    return value


def load_json_object(text: str, field: str) -> dict[str, Any] | None:
    """A JSON object field: the object, or None when the text is empty (`null` is not an
    object: empty text is how a caller says "none")."""
    if not text:
        return None
    value = load_json(text, field)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object, got {_json_type(value)}")
    return value


def load_metrics(text: str, field: str) -> dict[str, float]:
    """A JSON object of numbers (metric name -> value); empty text is no metrics."""
    value = load_json_object(text, field) or {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidArgument(
                f"{field}: expected a JSON object of numbers, {key!r} is {_json_type(number)}"
            )
    try:
        return {str(k): float(v) for k, v in value.items()}
    except OverflowError:  # an integer past a double's range
        raise InvalidArgument(f"{field}: a number is too large for a double") from None


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a double")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _json_type(value: Any) -> str:
    """`value`'s type as JSON names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
