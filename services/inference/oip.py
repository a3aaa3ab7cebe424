"""Open Inference Protocol V2 (`inference.GRPCInferenceService`) on the same models: protobuf in
(`convert`, which also holds the tensor codecs), the catalog and the data plane, protobuf out.
Errors are mapped by `rpc_errors`."""

from __future__ import annotations

import time
from typing import Any

from grpc import aio

from cyclone.errors import CycloneError
from cyclone.oip.v2 import open_inference_pb2 as pb
from cyclone.oip.v2 import open_inference_pb2_grpc as pb_grpc
from cyclone.rpc_errors import rpc_errors
from services.inference import convert
from services.inference.catalog import OIP_INFER_FIELDS, OIP_MODEL_FIELDS
from services.inference.dataplane import DataPlane
from services.inference.pool import PoolTarget


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.catalog = dataplane.catalog

    @rpc_errors()
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc_errors()
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        # A pool member is ready empty: it loads versions as requests name them.
        return pb.ServerReadyResponse(ready=self.catalog.pooled or bool(self.catalog.models))

    @rpc_errors()
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        if self.catalog.pooled:
            try:
                await self.catalog.acquire(
                    request.name, request.version, _pool_target(context), OIP_MODEL_FIELDS
                )
            except CycloneError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return pb.ModelReadyResponse(ready=self.catalog.is_ready(request.name, request.version))

    @rpc_errors()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return convert.server_metadata()

    @rpc_errors()
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        target = _pool_target(context) if self.catalog.pooled else None
        return convert.model_metadata(
            await self.catalog.acquire(request.name, request.version, target, OIP_MODEL_FIELDS)
        )

    @rpc_errors()
    async def ModelInfer(  # type: ignore[override]  # the generated base says message
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Answers with the response already serialized (see `convert.infer_response`)."""
        started = time.perf_counter()
        target = _pool_target(context) if self.catalog.pooled else None
        name, version = request.model_name, request.model_version
        model = self.catalog.lookup(
            name, version, target, OIP_INFER_FIELDS
        ) or await self.catalog.acquire(name, version, target, OIP_INFER_FIELDS)
        wanted = convert.requested_outputs(model, request)
        job = convert.quick_prepared_from_tensors(model, request)
        if job is not None:
            scored = self.dataplane.score_inline(model, job, started)
            ids, outputs = scored or await self.dataplane.score(model, job, started)
        else:
            columns = convert.columns_from_tensors(model, request)
            ids, outputs = await self.dataplane.predict(model, columns)
        return convert.infer_response(model, ids, outputs, wanted, request.id)

    @rpc_errors()
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        return convert.repository_index(self.catalog.index(ready_only=request.ready))

    @rpc_errors()
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelLoadResponse:
        if self.catalog.pooled:
            await self.catalog.acquire(
                request.model_name, convert.load_version(request) or "", fields=OIP_INFER_FIELDS
            )
        else:
            self.catalog.load(request.model_name, convert.load_version(request))
        return pb.RepositoryModelLoadResponse()

    @rpc_errors()
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelUnloadResponse:
        self.catalog.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _pool_target(context: aio.ServicerContext[Any, Any]) -> PoolTarget | None:
    return convert.pool_target(context.invocation_metadata())
