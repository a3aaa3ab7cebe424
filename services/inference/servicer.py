"""`cyclone.inference.v1.InferenceService`: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from grpc import aio

from cyclone.errors import CycloneError, InvalidArgument
from cyclone.ids import uuid7_batch
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.server import abort_on_domain_errors
from cyclone.telemetry import current_trace_id
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


def response_from_outputs(model: LoadedModel, ids: list[str], outputs: Outputs, request_id: str) -> pb.PredictResponse:
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

    async def score(self, model: LoadedModel, columns: Mapping[str, np.ndarray]) -> tuple[list[str], Outputs]:
        started = time.perf_counter()
        rows = model.validate(columns)
        feed = model.feed(columns)
        if rows > OFFLOAD_ROWS:
            outputs = await asyncio.to_thread(model.run, feed, rows)
        else:
            outputs = model.run(feed, rows)
        ids = uuid7_batch(rows)
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.sink.submit(model, ids, columns, outputs, latency_ms, current_trace_id())
        return ids, outputs


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.catalog = scorer.catalog

    async def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        model = self.catalog.get(request.model, request.version)
        ids, outputs = await self.scorer.score(model, columns_from_proto(request.features))
        return response_from_outputs(model, ids, outputs, request.request_id)

    async def Predict(self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]) -> pb.PredictResponse:
        try:
            return await self._predict(request)
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictStreamRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async for message in request_iterator:
            try:
                response = await self._predict(message.request)
            except CycloneError as exc:
                # One bad message must not end a long-lived stream.
                yield pb.PredictStreamResponse(error_code=exc.code.value[0], error_message=exc.message)
                continue
            yield pb.PredictStreamResponse(response=response)

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]) -> pb.GetModelResponse:
        try:
            return pb.GetModelResponse(model=model_info(self.catalog.get(request.model, request.version)))
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.catalog.models.values()])
