"""`cyclone.inference.v1.InferenceService`: protobuf in (`convert`), the catalog and the data
plane, protobuf out. Errors are mapped by `rpc_errors`; a PredictStream message that fails
answers with its own error and the stream goes on."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from grpc import aio

from cyclone.errors import CycloneError, NotFound
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.rpc_errors import rpc_errors
from cyclone.wire import PROBE_HEADER
from services.inference import convert
from services.inference.dataplane import DataPlane, Scored, StreamJob, read_ahead
from services.inference.pool import PoolTarget

# Request metadata marking the monitor's known-answer probes: answered, never logged.

# A stream reads at most this many messages ahead of the responses it has written.
STREAM_READ_AHEAD = 256


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.catalog = dataplane.catalog

    @rpc_errors()
    async def Predict(
        self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        target = _pool_target(context) if self.catalog.pooled else None
        model = self.catalog.lookup(
            request.model, request.version, target
        ) or await self.catalog.acquire(request.model, request.version, target)
        job = convert.prepared_from_proto(model, request.features)
        record = not _is_probe(context)
        scored = self.dataplane.score_inline(model, job, started, record=record)
        ids, outputs = scored or await self.dataplane.score(model, job, started, record=record)
        return convert.predict_response(model, ids, outputs, request.request_id)

    @rpc_errors()
    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictStreamRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        # Whatever the client has already sent is scored as one batch; responses still go
        # out one per message, in order.
        backlogs = read_ahead(request_iterator, STREAM_READ_AHEAD)
        target = _pool_target(context) if self.catalog.pooled else None
        async with contextlib.aclosing(backlogs):
            async for messages in backlogs:
                started = time.perf_counter()
                if self.catalog.pooled:
                    await self._load_for(messages, target)
                jobs = [self._stream_job(message.request, target) for message in messages]
                results = await self.dataplane.score_stream(jobs, started)
                for message, job, result in zip(messages, jobs, results, strict=True):
                    yield _stream_response(message.request, job, result)

    def _stream_job(
        self, request: pb.PredictRequest, target: PoolTarget | None
    ) -> StreamJob | Exception:
        try:
            model = self.catalog.lookup(request.model, request.version, target)
            if model is None:  # a pool member could not load it (`_load_for` said why)
                raise NotFound(
                    f"version: {request.model!r} version {request.version!r} is not loaded"
                )
            return StreamJob(model, convert.prepared_from_proto(model, request.features))
        except Exception as exc:
            return exc  # answered in its place: one bad message must not end the stream

    async def _load_for(
        self, messages: Sequence[pb.PredictStreamRequest], target: PoolTarget | None
    ) -> None:
        """A pool member loads the versions a backlog names before scoring it; a version that
        cannot be loaded is left for its messages to answer NOT_FOUND."""
        wanted = {(m.request.model, m.request.version) for m in messages}
        for name, version in wanted:
            with contextlib.suppress(CycloneError):
                await self.catalog.acquire(name, version, target)

    @rpc_errors()
    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        target = _pool_target(context) if self.catalog.pooled else None
        model = await self.catalog.acquire(request.model, request.version, target)
        return pb.GetModelResponse(model=convert.model_info(model))

    @rpc_errors()
    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        target = _pool_target(context) if self.catalog.pooled else None
        if target is not None:  # a pooled revision's route: that version, as a revision lists it
            models = [await self.catalog.acquire(target.model, target.version, target)]
        else:
            models = self.catalog.served()
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in models])


def _pool_target(context: aio.ServicerContext[Any, Any]) -> PoolTarget | None:
    return convert.pool_target(context.invocation_metadata())


def _is_probe(context: aio.ServicerContext[Any, Any]) -> bool:
    return any(
        key == PROBE_HEADER and value == "1" for key, value in context.invocation_metadata() or ()
    )


def _stream_response(
    request: pb.PredictRequest, job: StreamJob | Exception, result: Scored | Exception
) -> pb.PredictStreamResponse:
    if isinstance(result, CycloneError):
        return convert.stream_error(result)
    if isinstance(result, Exception):
        raise result  # not the caller's fault: ends the stream here, mapped by rpc_errors
    assert isinstance(job, StreamJob)
    ids, outputs = result
    return pb.PredictStreamResponse(
        response=convert.predict_response(job.model, ids, outputs, request.request_id)
    )
