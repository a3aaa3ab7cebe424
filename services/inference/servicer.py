"""`cyclone.inference.v1.InferenceService`: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
from grpc import aio

from cyclone.errors import CycloneError, InvalidArgument
from cyclone.ids import uuid7_batch
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.server import abort_on_domain_errors
from cyclone.telemetry import current_trace_id
from services.inference.batching import Prepared, run_batch
from services.inference.catalog import ModelCatalog
from services.inference.model import LoadedModel, Outputs
from services.inference.sink import NullSink, PredictionSink

# Batches above this many rows run in a worker thread (onnxruntime releases the GIL);
# smaller ones are cheaper inline than the thread hop.
OFFLOAD_ROWS = 256

_TASKS = {"regression": pb.TASK_REGRESSION, "classification": pb.TASK_CLASSIFICATION}
_KINDS = {"numeric": pb.FEATURE_KIND_NUMERIC, "categorical": pb.FEATURE_KIND_CATEGORICAL}


def columns_from_proto(features: Mapping[str, pb.FeatureColumn]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name, column in features.items():
        if column.numbers and column.strings:
            raise InvalidArgument(f"features.{name}: set either numbers or strings, not both")
        if column.strings:
            columns[name] = np.array(column.strings, dtype=object)
        else:
            columns[name] = np.fromiter(column.numbers, dtype=np.float64, count=len(column.numbers))
    return columns


def _quick_from_proto(
    model: LoadedModel, features: Mapping[str, pb.FeatureColumn]
) -> Prepared | None:
    """A plainly valid request straight to a (numeric features, rows) block; None when in doubt."""
    if len(features) != len(model.feature_names):
        return None
    numbers: dict[str, Any] = {}
    strings: dict[str, Any] = {}
    for name, column in features.items():
        texts = column.strings
        if texts:
            if column.numbers:
                return None
            strings[name] = texts
        else:
            numbers[name] = column.numbers
    if len(strings) != len(model.category_lookup) or not all(
        n in strings for n in model.category_lookup
    ):
        return None
    try:
        ordered = [numbers[name] for name in model.numeric_names]
    except KeyError:
        return None
    lengths = {len(values) for values in ordered}
    lengths.update(len(values) for values in strings.values())
    if len(lengths) != 1:
        return None
    rows = lengths.pop()
    if not 0 < rows <= model.max_batch_rows:
        return None
    columns: dict[str, np.ndarray] = {}
    block: np.ndarray | None = None
    if ordered:
        block = np.fromiter(
            chain.from_iterable(ordered), dtype=np.float64, count=rows * len(ordered)
        )
        block = block.reshape(len(ordered), rows)
        if not model.numeric_ok(block):
            return None
        columns = dict(zip(model.numeric_names, block, strict=True))
    for name, texts in strings.items():
        if not model.categories_ok(name, texts):
            return None
        columns[name] = np.array(texts, dtype=object)
    return Prepared(columns, rows, block)


def prepare_proto(model: LoadedModel, features: Mapping[str, pb.FeatureColumn]) -> Prepared:
    """Proto columns to a validated request; errors come from the one exact path."""
    quick = _quick_from_proto(model, features)
    if quick is not None:
        return quick
    columns = columns_from_proto(features)
    return Prepared(columns, model.validate(columns))


def _stream_error(exc: CycloneError) -> pb.PredictStreamResponse:
    return pb.PredictStreamResponse(error_code=exc.code.value[0], error_message=exc.message)


_PLACEHOLDER = pb.PredictStreamResponse()


def model_info(model: LoadedModel) -> pb.ModelInfo:
    schema = model.schema
    return pb.ModelInfo(
        name=schema.name,
        version=schema.version,
        task=_TASKS[schema.task],
        features=[
            pb.FeatureSpec(
                name=f.name,
                kind=_KINDS[f.kind],
                dtype=f.dtype,
                min=f.min,
                max=f.max,
                categories=f.categories,
                allow_missing=f.allow_missing,
            )
            for f in schema.features
        ],
        class_labels=schema.class_labels,
        sha256=model.sha256,
        max_batch_rows=model.max_batch_rows,
    )


def response_from_outputs(
    model: LoadedModel, ids: list[str], outputs: Outputs, request_id: str
) -> pb.PredictResponse:
    response = pb.PredictResponse(
        model=model.name, version=model.version, prediction_ids=ids, request_id=request_id
    )
    if outputs.values is not None:
        response.values.extend(outputs.values.tolist())
    else:
        assert outputs.labels is not None and outputs.probabilities is not None
        response.labels.extend(outputs.labels.tolist())
        response.class_labels.extend(model.schema.class_labels)
        response.probabilities.extend(outputs.probabilities.ravel().tolist())
    return response


class Scorer:
    """Validation, onnxruntime, ids and hand-off to the sink: shared by both APIs."""

    def __init__(self, catalog: ModelCatalog, sink: PredictionSink | None = None) -> None:
        self.catalog = catalog
        self.sink: PredictionSink = sink or NullSink()

    async def score(
        self, model: LoadedModel, columns: Mapping[str, np.ndarray]
    ) -> tuple[list[str], Outputs]:
        started = time.perf_counter()
        quick = model.quick_validate(columns)
        job = (
            Prepared(columns, model.validate(columns))
            if quick is None
            else Prepared(columns, *quick)
        )
        return await self.score_prepared(model, job, started)

    async def score_prepared(
        self, model: LoadedModel, job: Prepared, started: float
    ) -> tuple[list[str], Outputs]:
        """Score one validated request."""
        feed = model.feed_block(job.block, job.columns)
        if job.rows > OFFLOAD_ROWS:
            outputs = await asyncio.to_thread(model.run, feed, job.rows)
        else:
            outputs = model.run(feed, job.rows)
        ids = uuid7_batch(job.rows)
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.sink.submit(model, ids, job.columns, outputs, latency_ms, current_trace_id())
        return ids, outputs

    async def score_many(
        self, model: LoadedModel, jobs: Sequence[Prepared], started: float
    ) -> list[tuple[list[str], Outputs] | Exception]:
        """Score validated requests (one stream's backlog) in order, batched; one sink hand-off each."""
        small = [job for job in jobs if job.rows <= OFFLOAD_ROWS]
        batched = iter(run_batch(model, small))
        results: list[tuple[list[str], Outputs] | Exception] = []
        trace_id = current_trace_id()
        for job in jobs:
            outcome: Outputs | Exception
            if job.rows <= OFFLOAD_ROWS:
                outcome = next(batched)
            else:
                try:
                    feed = model.feed_block(job.block, job.columns)
                    outcome = await asyncio.to_thread(model.run, feed, job.rows)
                except Exception as exc:
                    outcome = exc
            if isinstance(outcome, Exception):
                results.append(outcome)
                continue
            ids = uuid7_batch(job.rows)
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.sink.submit(model, ids, job.columns, outcome, latency_ms, trace_id)
            results.append((ids, outcome))
        return results


# A stream reads at most this many messages ahead of the responses it has written.
STREAM_READ_AHEAD = 256


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.catalog = scorer.catalog

    async def Predict(
        self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        try:
            started = time.perf_counter()
            model = self.catalog.get(request.model, request.version)
            job = prepare_proto(model, request.features)
            ids, outputs = await self.scorer.score_prepared(model, job, started)
            return response_from_outputs(model, ids, outputs, request.request_id)
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictStreamRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        # A reader task runs ahead of scoring, so whatever the client has already sent
        # is scored as one batch; responses still go out one per message, in order.
        backlog: collections.deque[pb.PredictStreamRequest] = collections.deque()
        arrived, room = asyncio.Event(), asyncio.Event()
        room.set()

        async def read_ahead() -> None:
            try:
                async for message in request_iterator:
                    backlog.append(message)
                    arrived.set()
                    if len(backlog) >= STREAM_READ_AHEAD:
                        room.clear()
                        await room.wait()
            finally:
                arrived.set()

        reader = asyncio.create_task(read_ahead())
        try:
            while True:
                if not backlog:
                    if reader.done():
                        reader.result()  # a failed read ends the stream, as it did unbatched
                        return
                    arrived.clear()
                    await arrived.wait()
                    continue
                messages = list(backlog)
                backlog.clear()
                room.set()
                for response in await self._stream_batch(messages):
                    if isinstance(response, Exception):
                        raise response
                    yield response
        finally:
            if not reader.done():
                reader.cancel()

    async def _stream_batch(
        self, messages: list[pb.PredictStreamRequest]
    ) -> list[pb.PredictStreamResponse | Exception]:
        """Responses for `messages` in order; an exception in the list ends the stream there."""
        started = time.perf_counter()
        out: list[pb.PredictStreamResponse | Exception] = []
        # Runs of consecutive messages for the same model are scored together, so ids
        # still increase in message order.
        run: list[tuple[int, LoadedModel, Prepared, pb.PredictRequest]] = []

        async def flush() -> None:
            if not run:
                return
            model = run[0][1]
            results = await self.scorer.score_many(model, [job for _, _, job, _ in run], started)
            for (slot, _, _, request), result in zip(run, results, strict=True):
                if isinstance(result, CycloneError):
                    out[slot] = _stream_error(result)
                elif isinstance(result, Exception):
                    out[slot] = result
                else:
                    ids, outputs = result
                    out[slot] = pb.PredictStreamResponse(
                        response=response_from_outputs(model, ids, outputs, request.request_id)
                    )
            run.clear()

        for message in messages:
            request = message.request
            try:
                model = self.catalog.get(request.model, request.version)
                job = prepare_proto(model, request.features)
            except CycloneError as exc:
                # One bad message must not end a long-lived stream.
                out.append(_stream_error(exc))
                continue
            except Exception as exc:
                out.append(exc)
                continue
            if run and run[0][1] is not model:
                await flush()
            out.append(_PLACEHOLDER)
            run.append((len(out) - 1, model, job, request))
        await flush()
        return out

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        try:
            return pb.GetModelResponse(
                model=model_info(self.catalog.get(request.model, request.version))
            )
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.catalog.models.values()])
