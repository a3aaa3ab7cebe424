"""Predictions and labels: ingest, labels checked against the model, training windows, pages
of stored predictions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from cyclone.errors import InvalidArgument
from cyclone.ids import uuid7_time
from services.store.db import (
    EPOCH,
    ColumnChunk,
    FeatureFilter,
    LabelResult,
    PredictionRow,
    TrainingChunk,
)
from services.store.db.copy_binary import Payload, RecordError, WireRecord, encode_predictions
from services.store.db.ingest import ForeignLabels

from .checks import (
    check_window,
    finite,
    limit,
    load_json,
    not_negative,
    not_negative_number,
    one_of,
    parse_uuid7,
    require,
)
from .registry import RegistryArea

MAX_PAGE_SIZE = 1000
MAX_CHUNK_ROWS = 100_000
DEFAULT_CHUNK_ROWS = 10_000
FILTER_OPS = ("=", "!=", "<", "<=", ">", ">=")
_FAR_FUTURE = timedelta(days=3650)

# A label as sent: a number, a text, or nothing (the caller set neither).
LabelValue = float | str | None


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
class Logged:
    """What one LogPredictions call did with its records."""

    received: int
    inserted: int
    expired: int  # made before the retention cutoff: not stored, as their labels are not


class PredictionsArea(RegistryArea):
    async def log_predictions(self, batches: AsyncIterator[Sequence[WireRecord]]) -> Logged:
        """Ingest batches of records as they arrive. Records older than the retention cutoff
        are counted, not stored: their labels would be refused as expired, and retention
        would drop them anyway (a spool replayed after a long outage sends such records)."""
        received = inserted = expired = 0
        cutoff = self.db.retention_cutoff()
        pending: asyncio.Task[int] | None = None
        try:
            async for records in batches:
                # Encode this batch while PostgreSQL is still working through the previous one.
                payload = _encode(records, received)
                rows = payload.rows
                if (
                    cutoff is not None
                    and rows
                    and EPOCH + timedelta(milliseconds=payload.first_ms) < cutoff
                ):
                    records, payload = _drop_expired(records, cutoff, received)
                    expired += rows - payload.rows
                if pending is not None:
                    inserted += await pending
                    pending = None
                if payload.rows:
                    pending = asyncio.create_task(self._copy(records, payload, received))
                received += rows
            if pending is not None:
                inserted += await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return Logged(received, inserted, expired)

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
        try:
            return await self.db.add_labels(
                items, model=model, not_before=self.db.retention_cutoff()
            )
        except ForeignLabels as exc:
            i, pid = next((i, pid) for i, (pid, _) in enumerate(items) if pid in exc.owners)
            raise InvalidArgument(
                f"labels[{offset + i}].prediction_id: {pid} is a prediction of model"
                f" {exc.owners[pid]!r}, not {model!r} (nothing stored)"
            ) from None

    async def training_data(self, request: TrainingRequest) -> TrainingStream:
        """A window of a model's rows (labelled, or all with `include_unlabelled`)."""
        require("model", request.model)
        start, end = request.start, request.end
        check_window(start, end)
        not_negative("last_n", request.last_n)
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
        # Both readers take the same window: (start, end, last_n, version, chunk_rows).
        window = (start, end, request.last_n or None, request.version or None, chunk_rows)
        unlabelled = request.include_unlabelled
        if kinds and mv.task:
            # The schema is known: PostgreSQL hands over typed columns, no JSON in Python.
            columns = self.db.training_columns(
                request.model,
                list(kinds.items()),
                mv.task,
                classes,
                *window,
                include_unlabelled=unlabelled,
            )
            return TrainingStream(kinds, mv.task, classes, columns)
        chunks = self.db.training_data(request.model, *window, include_unlabelled=unlabelled)
        return TrainingStream(kinds, mv.task, classes, chunks)

    async def query_predictions(self, q: PredictionQuery) -> tuple[list[PredictionRow], str]:
        """One page of predictions and the next page's token ("" at the end)."""
        require("model", q.model)
        page_size = limit("page_size", q.page_size, MAX_PAGE_SIZE, 100)
        not_negative_number("tolerance", q.tolerance)
        check_window(q.start, q.end)
        feature_filter = None
        if q.feature_filter is not None:
            name, op, value = q.feature_filter
            require("feature_filter.name", name)
            one_of("feature_filter.op", op, FILTER_OPS)
            if value is None:
                raise InvalidArgument("feature_filter: set number or text")
            if not isinstance(value, str):
                finite("feature_filter.number", value)
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


def _encode(records: Sequence[WireRecord], offset: int) -> Payload:
    try:
        return encode_predictions(records)
    except RecordError as exc:
        raise InvalidArgument(f"records[{offset + exc.index}].{exc.field}: {exc.reason}") from None


def _drop_expired(
    records: Sequence[WireRecord], cutoff: datetime, offset: int
) -> tuple[Sequence[WireRecord], Payload]:
    """The batch without its records made before `cutoff`, encoded again (rare: only a batch
    whose oldest record is past retention pays for it)."""
    kept = [r for r in records if uuid7_time(r.prediction_id) >= cutoff]
    return kept, _encode(kept, offset)


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
