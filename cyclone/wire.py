"""Small helpers every service needs at its protobuf edge: timestamps and header names.

The one place these are spelled, so the SDK, the Envoy config, the services and the probes
agree on them without importing one another.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

# Envoy routes gRPC by this header (the model is also in the message; Envoy does not parse it).
MODEL_HEADER = "cyclone-model"
# A monitor probe's request: answered like any other, never logged as a prediction.
PROBE_HEADER = "cyclone-probe"
# Request headers a pooled revision's proxy cluster sets: the model version its processes,
# shared by many versions, answer (`cyclone.envoy.config`, `services/inference/pool.py`).
POOL_MODEL_HEADER = "cyclone-pool-model"
POOL_VERSION_HEADER = "cyclone-pool-version"


def ts(value: datetime) -> Timestamp:
    """An aware (or UTC-naive) datetime as a protobuf Timestamp."""
    out = Timestamp()
    out.FromDatetime(value.astimezone(UTC) if value.tzinfo is not None else value)
    return out


def ts_or_none(value: datetime | None) -> Timestamp | None:
    """`ts`, passing None through (proto3 message fields accept None as "unset")."""
    return None if value is None else ts(value)


def from_ts(message: Any, field: str) -> datetime | None:
    """`message.field` as an aware UTC datetime, None when unset."""
    if not message.HasField(field):
        return None
    result: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return result
