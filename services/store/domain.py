"""The store's domain: what each RPC means, on domain records, without protobuf or gRPC.

Every StoreService RPC is one method here; the servicers translate protobuf with `convert`
and call it, and it calls `StoreDB`. Validation names the request field at fault, and errors
are `cyclone.errors` types (the database layer raises those too), so `rpc_errors` maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from cyclone.errors import InvalidArgument, NotFound
from cyclone.models.schema import validate_name
from services.store.db import (
    EPOCH,
    Alert,
    AlreadyExistsError,
    ColumnChunk,
    EvaluationOutcome,
    FeatureFilter,
    Health,
    LabelResult,
    MetricPoint,
    MinuteStats,
    ModelStats,
    ModelStatus,
    ModelVersion,
    Plan,
    PredictionRow,
    StoreDB,
    TrainingChunk,
    TrainingJob,
)
from services.store.db.copy_binary import Payload, RecordError, WireRecord, encode_predictions

MAX_PAGE_SIZE = 1000
MAX_CHUNK_ROWS = 100_000
DEFAULT_CHUNK_ROWS = 10_000
MAX_CLAIM = 1000
# Per-minute traffic over more than this is a report, not a chart.
MAX_STATS_SPAN = timedelta(days=31)
FILTER_OPS = ("=", "!=", "<", "<=", ">", ">=")
LEVELS = ("GREEN", "AMBER", "RED")
TASKS = ("regression", "classification")
ALERT_STATUSES = ("pending", "failed", "delivered", "acknowledged", "dead")
_FAR_FUTURE = timedelta(days=3650)

# A label as sent: a number, a text, or nothing (the caller set neither).
LabelValue = float | str | None


# --- small checks shared by every RPC ----------------------------------------------------------


def require(field: str, value: str) -> str:
    """`value`, or INVALID_ARGUMENT naming `field` when it is empty."""
    if not value:
        raise InvalidArgument(f"{field}: empty")
    return value


def limit(field: str, value: int, maximum: int, default: int) -> int:
    """A page or batch size: 0 means `default`, otherwise 1..maximum."""
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"{field}: must be between 1 and {maximum}")
    return value or default


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


def load_json(text: str | bytes, field: str, default: Any = None) -> Any:
    """The store's one JSON policy for what callers send: strict JSON, as PostgreSQL's jsonb
    takes it (Python's NaN and Infinity are refused); empty text is `default`."""
    if not text:
        return default
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None


def load_json_object(text: str, field: str) -> dict[str, Any] | None:
    value = load_json(text, field)
    if value is not None and not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def label_json(value: LabelValue, index: int, task: str, classes: Sequence[str]) -> str:
    """The label as JSON, checked against the model's task."""
    field = f"labels[{index}]"
    if value is None:
        raise InvalidArgument(f"{field}: no value (set number or text)")
    if task == "regression":
        if isinstance(value, str):
            raise InvalidArgument(f"{field}.text: a regression model takes numeric labels")
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}.number: {value} is not a finite number")
        return json.dumps(value)
    if isinstance(value, str):
        text = value
    else:
        # Classes from integer targets are "0", "1", ...: accept 1 and 1.0 for "1".
        text = str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    if classes and text not in classes:
        raise InvalidArgument(
            f"{field}: {text!r} is not a class of this model ({', '.join(classes)})"
        )
    return json.dumps(text)


# --- requests and results that carry more than a few fields --------------------------------


@dataclass(frozen=True)
class TrainingRequest:
    model: str
    start: datetime | None = None
    end: datetime | None = None
    last_n: int = 0
    version: str = ""
    chunk_rows: int = 0
    include_unlabelled: bool = False


@dataclass(frozen=True)
class TrainingStream:
    """Chunks of a training window and the schema they follow: typed `ColumnChunk`s when the
    schema is known, JSON-backed `TrainingChunk`s otherwise."""

    kinds: dict[str, str]
    task: str | None
    classes: list[str]
    chunks: AsyncIterator[ColumnChunk] | AsyncIterator[TrainingChunk]


@dataclass(frozen=True)
class PredictionQuery:
    model: str
    version: str = ""
    start: datetime | None = None
    end: datetime | None = None
    labelled: bool | None = None
    wrong_only: bool = False
    # (name, op, value) as sent; value None when the caller set neither number nor text.
    feature_filter: tuple[str, str, float | str | None] | None = None
    page_size: int = 0
    page_token: str = ""
    tolerance: float = 0.0


@dataclass(frozen=True)
class EvaluationRecord:
    model: str
    version: str
    level: str
    reasons: list[Any]
    summary: dict[str, Any]
    points: list[MetricPoint]
    alerts: list[Alert]


class Store:
    """One method per StoreService RPC."""

    def __init__(self, db: StoreDB) -> None:
        self.db = db

    # -- registry -------------------------------------------------------------------------------

    async def _find_version(self, model: str, version: str) -> ModelVersion | None:
        """`version` of `model`, or without one the serving version, else the latest."""
        require("model", model)
        if version:
            return await self.db.get_model_version(model, version)
        return await self.db.serving_version(model) or await self.db.latest_version(model)

    async def resolve_version(self, model: str) -> ModelVersion:
        """The version a model's labels and windows follow: serving, else the latest."""
        mv = await self._find_version(model, "")
        if mv is None:
            raise NotFound(f"model: {model!r} is not registered")
        return mv

    async def register_model_version(
        self, mv: ModelVersion, *, if_not_exists: bool
    ) -> tuple[ModelVersion, bool]:
        """The stored version and whether this call created it."""
        require("model_version.model", mv.model)
        require("model_version.version", mv.version)
        if mv.task and mv.task not in TASKS:
            raise InvalidArgument(
                f"model_version.task: expected regression or classification, got {mv.task!r}"
            )
        if mv.status == "serving":
            raise InvalidArgument(
                "model_version.status: register as staged or canary, then SetModelStatus"
            )
        try:
            validate_name("model_version.model", mv.model)
            validate_name("model_version.version", mv.version)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            return await self.db.register_model_version(mv), True
        except AlreadyExistsError:
            existing = await self.db.get_model_version(mv.model, mv.version)
            if if_not_exists and existing is not None and existing.sha256 == mv.sha256:
                return existing, False
            differs = existing is not None and existing.sha256 != mv.sha256
            raise InvalidArgument(
                f"model_version: {mv.model!r} version {mv.version!r} is already registered"
                + (" with a different sha256" if differs else "")
            ) from None

    async def get_model_version(self, model: str, version: str) -> ModelVersion:
        mv = await self._find_version(model, version)
        if mv is None:
            raise NotFound(f"version: {model!r} {version or '(any)'} is not registered")
        return mv

    async def list_model_versions(self, model: str) -> list[ModelVersion]:
        return await self.db.list_model_versions(model or None)

    async def set_model_status(
        self, model: str, version: str, status: ModelStatus | None
    ) -> ModelVersion:
        if status is None:
            raise InvalidArgument("status: set one of STAGED, CANARY, SERVING, RETIRED")
        require("version", version)
        await self.get_model_version(model, version)
        return await self.db.set_model_status(model, version, status)

    async def stats(self, model: str) -> tuple[list[ModelStats], str]:
        """Per-model stats and the storage mode."""
        return await self.db.stats(model or None), self.db.mode

    # -- predictions and labels -----------------------------------------------------------------

    async def log_predictions(
        self, batches: AsyncIterator[Sequence[WireRecord]]
    ) -> tuple[int, int]:
        """Ingest batches of records as they arrive: (received, newly inserted)."""
        received = inserted = 0
        pending: asyncio.Task[int] | None = None
        try:
            async for records in batches:
                # Encode this batch while PostgreSQL is still working through the previous one.
                payload = _encode(records, received)
                if pending is not None:
                    inserted += await pending
                    pending = None
                if payload.rows:
                    pending = asyncio.create_task(self._copy(records, payload, received))
                received += payload.rows
            if pending is not None:
                inserted += await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return received, inserted

    async def _copy(self, records: Sequence[WireRecord], payload: Payload, offset: int) -> int:
        try:
            span = (
                EPOCH + timedelta(milliseconds=payload.first_ms),
                EPOCH + timedelta(milliseconds=payload.last_ms),
            )
            return await self.db.copy_prediction_payload(payload.data, payload.rows, span)
        except psycopg.DataError:
            raise _bad_json(records, offset) from None

    async def add_labels(
        self, model: str, labels: Sequence[tuple[str, LabelValue]], offset: int = 0
    ) -> LabelResult:
        """Labels as (prediction id, value), checked against the model's task and classes."""
        mv = await self.resolve_version(model)
        task = mv.task or "regression"
        classes = [str(c) for c in (mv.schema or {}).get("class_labels", [])]
        items = [
            (
                parse_uuid7(pid, f"labels[{offset + i}].prediction_id"),
                label_json(value, offset + i, task, classes),
            )
            for i, (pid, value) in enumerate(labels)
        ]
        if not items:
            raise InvalidArgument("labels: empty")
        return await self.db.add_labels(items, model=model, not_before=self.db.retention_cutoff())

    async def training_data(self, request: TrainingRequest) -> TrainingStream:
        """A window of a model's rows (labelled, or all with `include_unlabelled`)."""
        require("model", request.model)
        start, end = request.start, request.end
        check_window(start, end)
        if request.last_n < 0:
            raise InvalidArgument("last_n: must not be negative")
        chunk_rows = limit("chunk_rows", request.chunk_rows, MAX_CHUNK_ROWS, DEFAULT_CHUNK_ROWS)
        mv = await self.resolve_version(request.model)
        if (start is None) != (end is None):
            start = start or EPOCH
            end = end or datetime.now(UTC) + _FAR_FUTURE
        if start is None and not request.last_n:
            start, end = EPOCH, datetime.now(UTC) + _FAR_FUTURE
        schema = mv.schema or {}
        kinds = {f["name"]: f.get("kind", "numeric") for f in schema.get("features", [])}
        classes = [str(c) for c in schema.get("class_labels", [])]
        last_n, version = request.last_n or None, request.version or None
        if kinds and mv.task:
            # The schema is known: PostgreSQL hands over typed columns, no JSON in Python.
            columns = self.db.training_columns(
                request.model,
                list(kinds.items()),
                mv.task,
                classes,
                start,
                end,
                last_n,
                version,
                chunk_rows,
                include_unlabelled=request.include_unlabelled,
            )
            return TrainingStream(kinds, mv.task, classes, columns)
        chunks = self.db.training_data(
            request.model,
            start,
            end,
            last_n,
            version,
            chunk_rows,
            include_unlabelled=request.include_unlabelled,
        )
        return TrainingStream(kinds, mv.task, classes, chunks)

    async def query_predictions(self, q: PredictionQuery) -> tuple[list[PredictionRow], str]:
        """One page of predictions and the next page's token ("" at the end)."""
        require("model", q.model)
        page_size = limit("page_size", q.page_size, MAX_PAGE_SIZE, 100)
        check_window(q.start, q.end)
        feature_filter = None
        if q.feature_filter is not None:
            name, op, value = q.feature_filter
            require("feature_filter.name", name)
            if op not in FILTER_OPS:
                raise InvalidArgument(
                    f"feature_filter.op: expected one of {', '.join(FILTER_OPS)}, got {op!r}"
                )
            if value is None:
                raise InvalidArgument("feature_filter: set number or text")
            feature_filter = FeatureFilter(name, op, value)  # type: ignore[arg-type]
        try:
            rows, token = await self.db.query_predictions(
                q.model,
                q.version or None,
                q.start,
                q.end,
                q.labelled,
                q.wrong_only,
                feature_filter,
                page_size,
                q.page_token or None,
                tolerance=q.tolerance,
            )
        except ValueError as exc:
            raise InvalidArgument(f"page_token: {exc}") from None
        return rows, token or ""

    # -- monitoring: plans, evaluations, health, metric history ---------------------------------

    async def save_plan(self, model: str, plan_yaml: str) -> int:
        require("model", model)
        require("plan_yaml", plan_yaml.strip())
        return await self.db.save_plan(model, plan_yaml)

    async def get_plan(self, model: str, revision: int) -> Plan:
        require("model", model)
        if revision < 0:
            raise InvalidArgument("revision: must not be negative")
        plan = await self.db.get_plan(model, revision or None)
        if plan is None:
            raise NotFound(
                f"model: {model!r} has no monitoring plan"
                + (f" revision {revision}" if revision else "")
            )
        return plan

    async def record_evaluation(self, ev: EvaluationRecord) -> EvaluationOutcome:
        require("model", ev.model)
        require("version", ev.version)
        if ev.level not in LEVELS:
            raise InvalidArgument(f"level: expected one of {', '.join(LEVELS)}, got {ev.level!r}")
        return await self.db.record_evaluation(
            ev.model, ev.version, ev.level, ev.reasons, ev.summary, ev.points, ev.alerts
        )

    async def health(self, model: str) -> list[Health]:
        return await self.db.health(model or None)

    async def metric_points(
        self, model: str, start: datetime | None, end: datetime | None, metric: str
    ) -> list[MetricPoint]:
        """Points in [start, end), by default the last day."""
        require("model", model)
        end = end or datetime.now(UTC) + timedelta(seconds=1)
        start = start or end - timedelta(days=1)
        if end <= start:
            raise InvalidArgument("end: must be after start")
        return await self.db.metric_points(model, start, end, metric or None)

    async def prediction_stats(
        self, model: str, start: datetime | None, end: datetime | None
    ) -> list[MinuteStats]:
        """Traffic and latency per version and minute in [start, end), by default the last hour."""
        require("model", model)
        end = end or datetime.now(UTC) + timedelta(seconds=1)
        start = start or end - timedelta(hours=1)
        if end <= start:
            raise InvalidArgument("end: must be after start")
        if end - start > MAX_STATS_SPAN:
            raise InvalidArgument(f"start: the span must be at most {MAX_STATS_SPAN.days} days")
        return await self.db.prediction_stats(model, start, end)

    # -- the alert outbox -----------------------------------------------------------------------

    async def claim_alerts(self, max_alerts: int, lease_seconds: int) -> list[Alert]:
        claim = limit("limit", max_alerts, MAX_CLAIM, 100)
        if lease_seconds < 0:
            raise InvalidArgument("lease_seconds: must not be negative")
        return await self.db.due_alerts(
            datetime.now(UTC), claim, timedelta(seconds=lease_seconds or 60)
        )

    async def complete_alert(
        self, alert_id: int, delivered: bool, error: str, next_attempt_at: datetime | None
    ) -> None:
        _check_alert_id(alert_id)
        if delivered:
            await self.db.mark_alert_delivered(alert_id)
        else:
            await self.db.mark_alert_failed(alert_id, error or "unknown error", next_attempt_at)

    async def acknowledge_alert(self, alert_id: int) -> Alert:
        _check_alert_id(alert_id)
        await self.db.acknowledge_alert(alert_id)
        alert = await self.db.get_alert(alert_id)
        if alert is None:
            raise NotFound(f"alert_id: {alert_id} not found")
        return alert

    async def list_alerts(self, model: str, status: str, max_alerts: int) -> list[Alert]:
        if status and status not in ALERT_STATUSES:
            raise InvalidArgument(
                f"status: expected one of {', '.join(ALERT_STATUSES)}, got {status!r}"
            )
        count = limit("limit", max_alerts, MAX_CLAIM, 100)
        return await self.db.list_alerts(model or None, status or None, count)

    # -- training jobs: ownership as a lease ---------------------------------------------------

    async def create_training_job(
        self, model: str, alert_id: int, reason: str, owner: str, lease_seconds: float
    ) -> tuple[TrainingJob, bool]:
        """Queue a job leased to `owner`; an alert's existing job instead (created=False)."""
        try:
            validate_name("model", model)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if alert_id < 0:
            raise InvalidArgument("alert_id: must not be negative")
        lease = lease_of("lease_seconds", lease_seconds)
        job, created = await self.db.create_training_job(
            model, alert_id or None, reason, owner, lease
        )
        if job.model != model:
            raise InvalidArgument(
                f"alert_id: alert {alert_id} already has a job for model {job.model!r}"
            )
        return job, created

    async def heartbeat_training_jobs(self, owner: str, lease_seconds: float) -> list[int]:
        require("owner", owner)
        return await self.db.heartbeat_training_jobs(
            owner, lease_of("lease_seconds", lease_seconds)
        )

    async def claim_training_jobs(
        self, owner: str, lease_seconds: float, reason: str, max_jobs: int
    ) -> tuple[list[TrainingJob], list[TrainingJob]]:
        """(queued jobs now `owner`'s, running ones failed): those whose lease expired."""
        require("owner", owner)
        return await self.db.claim_training_jobs(
            owner,
            lease_of("lease_seconds", lease_seconds),
            reason or "its trainer stopped renewing the job's lease before it finished",
            limit("limit", max_jobs, MAX_PAGE_SIZE, 100),
        )


# A job's lease when the caller names none, and the longest one (a trainer that stopped
# must not hold its jobs for long).
DEFAULT_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 3600.0


def lease_of(field: str, seconds: float) -> float:
    """A lease length: 0 means the default, otherwise more than 0 and at most an hour."""
    if seconds == 0:
        return DEFAULT_LEASE_SECONDS
    if not 0 < seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(
            f"{field}: must be more than 0 and at most {MAX_LEASE_SECONDS:g} s, got {seconds:g}"
        )
    return seconds


def _check_alert_id(alert_id: int) -> None:
    if alert_id <= 0:
        raise InvalidArgument("alert_id: must be positive")


def _encode(records: Sequence[WireRecord], offset: int) -> Payload:
    try:
        return encode_predictions(records)
    except RecordError as exc:
        raise InvalidArgument(f"records[{offset + exc.index}].{exc.field}: {exc.reason}") from None


def _bad_json(records: Sequence[WireRecord], offset: int) -> InvalidArgument:
    """The database refused a batch as malformed: name the record and field at fault."""
    for i, r in enumerate(records):
        for name in ("input_json", "output_json"):
            field, text = f"records[{offset + i}].{name}", getattr(r, name)
            if not text:
                return InvalidArgument(f"{field}: not valid JSON (empty)")
            try:
                load_json(text, field)
            except InvalidArgument as exc:
                return exc
    return InvalidArgument("records: the database rejected the batch as malformed")
