"""`cyclone.store.v1.StoreService` on top of `StoreDB`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from grpc import aio

from cyclone.errors import InvalidArgument, NotFound
from cyclone.models.schema import validate_name
from cyclone.server import abort_on_domain_errors
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.store import convert
from services.store.db import (
    AlreadyExistsError,
    FeatureFilter,
    ModelVersion,
    StoreDB,
)
from services.store.db.copy_binary import RecordError, encode_predictions
from services.store.guard import store_rpc
from services.store.monitoring_rpcs import MonitoringRpcs
from services.store.rollout_rpcs import RolloutRpcs

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
MAX_CHUNK_ROWS = 100_000
DEFAULT_CHUNK_ROWS = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OPS = ("=", "!=", "<", "<=", ">", ">=")

T = TypeVar("T")


def encode_batch(request: pb.LogPredictionsRequest, offset: int) -> tuple[bytes, int]:
    try:
        return encode_predictions(request.records)
    except RecordError as exc:
        raise InvalidArgument(f"records[{offset + exc.index}].{exc.field}: {exc.reason}") from None


def _find_bad_json(records: Sequence[pb.PredictionRecord], offset: int) -> InvalidArgument:
    for i, r in enumerate(records):
        for name, text in (("input_json", r.input_json), ("output_json", r.output_json)):
            try:
                json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return InvalidArgument(f"records[{offset + i}].{name}: not valid JSON ({exc})")
    return InvalidArgument("records: the database rejected the batch as malformed")


class StoreServicer(MonitoringRpcs, RolloutRpcs, pb_grpc.StoreServiceServicer):
    def __init__(self, db: StoreDB) -> None:
        self.db = db

    async def _copy(
        self, request: pb.LogPredictionsRequest, payload: bytes, rows: int, offset: int
    ) -> int:
        try:
            return await self.db.copy_prediction_payload(payload, rows)
        except psycopg.DataError:
            raise _find_bad_json(request.records, offset) from None

    @store_rpc
    async def LogPredictions(
        self, request_iterator: AsyncIterator[pb.LogPredictionsRequest]
    ) -> pb.LogPredictionsResponse:
        received = inserted = 0
        pending: asyncio.Task[int] | None = None
        try:
            async for request in request_iterator:
                # Encode this batch while PostgreSQL is still working through the previous one.
                payload, rows = encode_batch(request, received)
                if pending is not None:
                    inserted += await pending
                    pending = None
                if rows:
                    pending = asyncio.create_task(self._copy(request, payload, rows, received))
                received += rows
            if pending is not None:
                inserted += await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return pb.LogPredictionsResponse(received=received, inserted=inserted)

    async def _model_task(self, model: str) -> tuple[str, list[str]]:
        if not model:
            raise InvalidArgument("model: empty")
        mv = await self.db.serving_version(model) or await self.db.latest_version(model)
        if mv is None:
            raise NotFound(f"model: {model!r} is not registered")
        classes = [str(c) for c in (mv.schema or {}).get("class_labels", [])]
        return mv.task or "regression", classes

    async def _add_labels(
        self, request: pb.AddLabelsRequest, offset: int = 0
    ) -> tuple[int, list[str]]:
        task, classes = await self._model_task(request.model)
        items: list[tuple[uuid.UUID, str]] = []
        for i, label in enumerate(request.labels):
            pid = convert.parse_uuid7(label.prediction_id, f"labels[{offset + i}].prediction_id")
            items.append((pid, convert.label_json(label, offset + i, task, classes)))
        if not items:
            raise InvalidArgument("labels: empty")
        result = await self.db.add_labels(items, model=request.model)
        return result.stored, [str(u) for u in result.unmatched]

    @store_rpc
    async def AddLabels(self, request: pb.AddLabelsRequest) -> pb.AddLabelsResponse:
        stored, unmatched = await self._add_labels(request)
        return pb.AddLabelsResponse(stored=stored, unmatched_prediction_ids=unmatched)

    @store_rpc
    async def AddLabelsStream(
        self, request_iterator: AsyncIterator[pb.AddLabelsStreamRequest]
    ) -> pb.AddLabelsStreamResponse:
        stored, seen, unmatched = 0, 0, []
        async for message in request_iterator:
            n, missing = await self._add_labels(message.batch, seen)
            stored += n
            seen += len(message.batch.labels)
            unmatched.extend(missing)
        return pb.AddLabelsStreamResponse(stored=stored, unmatched_prediction_ids=unmatched)

    async def GetTrainingData(
        self, request: pb.GetTrainingDataRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GetTrainingDataResponse]:
        try:
            if not request.model:
                raise InvalidArgument("model: empty")
            start, end = convert.from_ts(request, "start"), convert.from_ts(request, "end")
            if start is not None and end is not None and end <= start:
                raise InvalidArgument("end: must be after start")
            if request.last_n < 0:
                raise InvalidArgument("last_n: must not be negative")
            if not 0 <= request.chunk_rows <= MAX_CHUNK_ROWS:
                raise InvalidArgument(f"chunk_rows: must be between 1 and {MAX_CHUNK_ROWS}")
            mv = await self.db.serving_version(request.model) or await self.db.latest_version(
                request.model
            )
            if mv is None:
                raise NotFound(f"model: {request.model!r} is not registered")
            if (start is None) != (end is None):
                start = start or _EPOCH
                end = end or datetime.now(UTC) + timedelta(days=3650)
            if start is None and not request.last_n:
                start, end = _EPOCH, datetime.now(UTC) + timedelta(days=3650)
            schema = mv.schema or {}
            kinds = {f["name"]: f.get("kind", "numeric") for f in schema.get("features", [])}
            classes = [str(c) for c in schema.get("class_labels", [])]
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise
        chunk_rows = request.chunk_rows or DEFAULT_CHUNK_ROWS
        if kinds and mv.task:
            # The schema is known: PostgreSQL hands over typed columns, no JSON in Python.
            columns = self.db.training_columns(
                request.model,
                list(kinds.items()),
                mv.task,
                classes,
                start,
                end,
                request.last_n or None,
                request.version or None,
                chunk_rows,
                include_unlabelled=request.include_unlabelled,
            )
            async with contextlib.aclosing(columns):  # type: ignore[type-var]
                async for column_chunk in columns:
                    yield convert.column_chunk_to_pb(column_chunk, kinds, mv.task, classes)
            return
        chunks = self.db.training_data(
            request.model,
            start,
            end,
            request.last_n or None,
            request.version or None,
            chunk_rows,
            include_unlabelled=request.include_unlabelled,
        )
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                yield convert.chunk_to_pb(chunk, kinds, mv.task, classes)

    @store_rpc
    async def QueryPredictions(
        self, request: pb.QueryPredictionsRequest
    ) -> pb.QueryPredictionsResponse:
        if not request.model:
            raise InvalidArgument("model: empty")
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size: must be between 1 and {MAX_PAGE_SIZE}")
        start, end = convert.from_ts(request, "start"), convert.from_ts(request, "end")
        if start is not None and end is not None and end <= start:
            raise InvalidArgument("end: must be after start")
        feature_filter = None
        if request.HasField("feature_filter"):
            f = request.feature_filter
            if not f.name:
                raise InvalidArgument("feature_filter.name: empty")
            if f.op not in _OPS:
                raise InvalidArgument(
                    f"feature_filter.op: expected one of {', '.join(_OPS)}, got {f.op!r}"
                )
            kind = f.WhichOneof("value")
            if kind is None:
                raise InvalidArgument("feature_filter: set number or text")
            feature_filter = FeatureFilter(f.name, f.op, f.number if kind == "number" else f.text)  # type: ignore[arg-type]
        labelled = {pb.LABEL_FILTER_LABELLED: True, pb.LABEL_FILTER_UNLABELLED: False}.get(
            request.label_filter
        )
        try:
            rows, token = await self.db.query_predictions(
                request.model,
                request.version or None,
                start,
                end,
                labelled,
                request.wrong_only,
                feature_filter,
                request.page_size or 100,
                request.page_token or None,
                tolerance=request.tolerance,
            )
        except ValueError as exc:
            raise InvalidArgument(f"page_token: {exc}") from None
        return pb.QueryPredictionsResponse(
            predictions=[convert.prediction_to_pb(r) for r in rows], next_page_token=token or ""
        )

    @store_rpc
    async def RegisterModelVersion(
        self, request: pb.RegisterModelVersionRequest
    ) -> pb.RegisterModelVersionResponse:
        mv = convert.model_version_from_pb(request.model_version)
        try:
            validate_name("model_version.model", mv.model)
            validate_name("model_version.version", mv.version)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            stored = await self.db.register_model_version(mv)
            created = True
        except AlreadyExistsError:
            existing = await self.db.get_model_version(mv.model, mv.version)
            if not request.if_not_exists or existing is None or existing.sha256 != mv.sha256:
                raise InvalidArgument(
                    f"model_version: {mv.model!r} version {mv.version!r} is already registered"
                    + (
                        " with a different sha256"
                        if existing is not None and existing.sha256 != mv.sha256
                        else ""
                    )
                ) from None
            stored, created = existing, False
        return pb.RegisterModelVersionResponse(
            model_version=convert.model_version_to_pb(stored), created=created
        )

    async def _version(self, model: str, version: str) -> ModelVersion:
        if not model:
            raise InvalidArgument("model: empty")
        if version:
            mv = await self.db.get_model_version(model, version)
        else:
            mv = await self.db.serving_version(model) or await self.db.latest_version(model)
        if mv is None:
            raise NotFound(f"version: {model!r} {version or '(any)'} is not registered")
        return mv

    @store_rpc
    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest
    ) -> pb.GetModelVersionResponse:
        mv = await self._version(request.model, request.version)
        return pb.GetModelVersionResponse(model_version=convert.model_version_to_pb(mv))

    @store_rpc
    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest
    ) -> pb.ListModelVersionsResponse:
        versions = await self.db.list_model_versions(request.model or None)
        return pb.ListModelVersionsResponse(
            model_versions=[convert.model_version_to_pb(v) for v in versions]
        )

    @store_rpc
    async def SetModelStatus(self, request: pb.SetModelStatusRequest) -> pb.SetModelStatusResponse:
        status = convert.PB_TO_STATUS.get(request.status)
        if status is None:
            raise InvalidArgument("status: set one of STAGED, CANARY, SERVING, RETIRED")
        if not request.version:
            raise InvalidArgument("version: empty")
        await self._version(request.model, request.version)
        await self.db.set_model_status(request.model, request.version, status)  # type: ignore[arg-type]
        mv = await self._version(request.model, request.version)
        return pb.SetModelStatusResponse(model_version=convert.model_version_to_pb(mv))

    @store_rpc
    async def GetStats(self, request: pb.GetStatsRequest) -> pb.GetStatsResponse:
        stats = await self.db.stats(request.model or None)
        return pb.GetStatsResponse(
            models=[convert.stats_to_pb(s) for s in stats], storage_mode=self.db.mode
        )
