"""Records exchanged with StoreDB, plus UUIDv7 helpers."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

from cyclone.errors import CycloneError, InvalidArgument, NotFound

Mode = Literal["timescaledb", "postgres-partitioned"]
ModelStatus = Literal["staged", "canary", "serving", "retired"]
FilterOp = Literal["=", "!=", "<", "<=", ">", ">="]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StoreError(CycloneError):
    """Base class of the database layer's own errors; each is a `cyclone.errors` domain error,
    so `rpc_errors` maps it without a translator."""


class NotFoundError(StoreError, NotFound):
    """The row to change does not exist (NOT_FOUND)."""


class AlreadyExistsError(StoreError, InvalidArgument):
    """The key is taken (INVALID_ARGUMENT: the caller named something already registered)."""


def uuid7(at: datetime | None = None) -> uuid.UUID:
    """A UUIDv7 whose first 48 bits are ``at`` (default now) in Unix milliseconds."""
    ms = int(time.time() * 1000) if at is None else int((at - EPOCH) / timedelta(milliseconds=1))
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | (0x7 << 76)  # version 7
    value = value & ~(0x3 << 62) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def uuid7_time(prediction_id: uuid.UUID | str) -> datetime:
    """The millisecond timestamp embedded in a UUIDv7 (== predictions.created_at)."""
    u = prediction_id if isinstance(prediction_id, uuid.UUID) else uuid.UUID(prediction_id)
    return EPOCH + timedelta(milliseconds=u.int >> 80)


class PredictionRecord(NamedTuple):
    """One row for ``copy_predictions``; field order is the COPY column order.

    ``input_json``/``output_json`` are already-serialised JSON (str or UTF-8 bytes) and are sent
    as-is. ``created_at`` may be None: it is then derived from the UUIDv7 id.
    """

    prediction_id: uuid.UUID | str
    created_at: datetime | None
    model: str
    version: str
    input_json: str | bytes
    output_json: str | bytes
    latency_ms: float | None = None
    trace_id: str | None = None


def _bulk_json(texts: Sequence[str]) -> list[Any]:
    # One json.loads over a JSON array is several times faster than one call per row.
    if not texts:
        return []
    result: list[Any] = json.loads("[" + ",".join(texts) + "]")
    return result


@dataclass(frozen=True, slots=True)
class TrainingChunk:
    """Columnar labelled rows, time ordered. JSON columns stay text until asked for."""

    prediction_ids: Sequence[uuid.UUID]
    created_at: Sequence[datetime]
    input_json: Sequence[str]
    output_json: Sequence[str]
    label_json: Sequence[str | None]

    def __len__(self) -> int:
        return len(self.prediction_ids)

    def inputs(self) -> list[dict[str, Any]]:
        return _bulk_json(self.input_json)

    def outputs(self) -> list[dict[str, Any]]:
        return _bulk_json(self.output_json)

    def labels(self) -> list[Any]:
        """Labels, None for unlabelled rows (monitoring windows include those)."""
        return _bulk_json([t if t is not None else "null" for t in self.label_json])


@dataclass(frozen=True, slots=True)
class ColumnChunk:
    """Typed columns of labelled (or, for monitoring, all) rows, time ordered.

    Numeric values are floats or None (missing); ``probabilities`` has one column per class.
    """

    prediction_ids: Sequence[str]
    created_at_micros: Sequence[int]
    labelled: Sequence[bool]
    features: dict[str, Sequence[Any]]
    predictions: Sequence[Any]
    probabilities: Sequence[Sequence[float | None]]
    labels: Sequence[Any]
    # Model latency per row in ms; None where the inference server recorded none.
    latency_ms: Sequence[float | None] = ()

    def __len__(self) -> int:
        return len(self.prediction_ids)


@dataclass(frozen=True, slots=True)
class FeatureFilter:
    """``input[name] <op> value``; compared as JSON of the same type (no SQL text from users)."""

    name: str
    op: FilterOp
    value: float | int | str | bool


@dataclass(frozen=True, slots=True)
class PredictionRow:
    prediction_id: uuid.UUID
    created_at: datetime
    model: str
    version: str
    input: dict[str, Any]
    output: dict[str, Any]
    latency_ms: float | None
    trace_id: str | None
    label: Any | None
    labelled_at: datetime | None


@dataclass(frozen=True, slots=True)
class LabelResult:
    stored: int
    unmatched: list[uuid.UUID]
    # Ids of predictions past the store's retention: their labels are not stored.
    expired: list[uuid.UUID] = field(default_factory=list)


@dataclass(slots=True)
class ModelVersion:
    model: str
    version: str
    artifact_uri: str | None = None
    sha256: str | None = None
    schema: dict[str, Any] | None = None
    task: str | None = None
    parent_version: str | None = None
    training_window_start: datetime | None = None
    training_window_end: datetime | None = None
    triggering_alert_id: int | None = None
    evaluation: dict[str, Any] | None = None
    reference_profile: dict[str, Any] | None = None
    status: ModelStatus = "staged"
    created_at: datetime | None = None
    # Lineage of retrained versions (migration 0004).
    training_rows: int | None = None
    family: str | None = None
    hyperparameters: dict[str, Any] | None = None
    holdout_metrics: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelStats:
    model: str
    predictions: int
    labels: int
    label_coverage: float
    last_prediction_at: datetime | None
    ingest_lag_seconds: float | None


@dataclass(frozen=True, slots=True)
class MinuteStats:
    model: str
    version: str
    bucket: datetime
    predictions: int
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    max_latency_ms: float | None
    avg_value: float | None


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    revision: int
    plan_yaml: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MetricPoint:
    created_at: datetime
    model: str
    version: str | None
    metric: str
    value: float | None
    level: str | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """One action of an alert and the sink that delivers it (a JSON object in `alerts.actions`)."""

    action: str
    sink: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "sink": self.sink, "config": self.config}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlertTarget:
        return cls(str(data.get("action", "")), str(data.get("sink", "")), data.get("config") or {})


@dataclass(slots=True)
class Alert:
    model: str
    level: str
    version: str | None = None
    previous_level: str | None = None
    reasons: list[Any] = field(default_factory=list)
    targets: list[AlertTarget] = field(default_factory=list)
    id: int | None = None
    created_at: datetime | None = None
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    acknowledged_at: datetime | None = None
    last_error: str | None = None
    # W3C traceparent of the evaluation that raised it; "" when tracing was off.
    traceparent: str = ""
