"""`cyclone.store.v1.StoreService`: protobuf in, one `Store` (the domain package) call,
protobuf out.

This class holds the registry, prediction and label RPCs and mixes in the others by area
(`monitoring_rpcs`, `training_rpcs`, `rollout_rpcs`); every one goes servicer -> `convert` ->
`domain.Store` -> `db.StoreDB`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.store import convert
from services.store.db import StoreDB
from services.store.domain import Store
from services.store.errors import database_errors
from services.store.lease_rpcs import LeaseRpcs
from services.store.monitoring_rpcs import MonitoringRpcs
from services.store.rollout_rpcs import RolloutRpcs
from services.store.rpc_area import Context
from services.store.training_rpcs import TrainingRpcs


class StoreServicer(
    MonitoringRpcs, TrainingRpcs, RolloutRpcs, LeaseRpcs, pb_grpc.StoreServiceServicer
):
    def __init__(self, db: StoreDB) -> None:
        self.store = Store(db)

    @rpc_errors(translate=database_errors)
    async def LogPredictions(
        self, request_iterator: AsyncIterator[pb.LogPredictionsRequest], context: Context
    ) -> pb.LogPredictionsResponse:
        logged = await self.store.log_predictions(
            request.records async for request in request_iterator
        )
        return pb.LogPredictionsResponse(
            received=logged.received, inserted=logged.inserted, expired=logged.expired
        )

    @rpc_errors(translate=database_errors)
    async def AddLabels(
        self, request: pb.AddLabelsRequest, context: Context
    ) -> pb.AddLabelsResponse:
        result = await self.store.add_labels(request.model, convert.labels_from_pb(request.labels))
        return pb.AddLabelsResponse(
            stored=result.stored,
            unmatched_prediction_ids=[str(u) for u in result.unmatched],
            expired_prediction_ids=[str(u) for u in result.expired],
        )

    @rpc_errors(translate=database_errors)
    async def AddLabelsStream(
        self, request_iterator: AsyncIterator[pb.AddLabelsStreamRequest], context: Context
    ) -> pb.AddLabelsStreamResponse:
        stored, seen, unmatched, expired = 0, 0, list[str](), list[str]()
        async for message in request_iterator:
            batch = message.batch
            result = await self.store.add_labels(
                batch.model, convert.labels_from_pb(batch.labels), seen
            )
            stored += result.stored
            seen += len(batch.labels)
            unmatched.extend(str(u) for u in result.unmatched)
            expired.extend(str(u) for u in result.expired)
        return pb.AddLabelsStreamResponse(
            stored=stored, unmatched_prediction_ids=unmatched, expired_prediction_ids=expired
        )

    @rpc_errors(translate=database_errors)
    async def GetTrainingData(
        self, request: pb.GetTrainingDataRequest, context: Context
    ) -> AsyncIterator[pb.GetTrainingDataResponse]:
        stream = await self.store.training_data(convert.training_request_from_pb(request))
        async with contextlib.aclosing(stream.chunks):  # type: ignore[type-var]
            async for chunk in stream.chunks:
                yield convert.training_chunk_to_pb(chunk, stream)

    @rpc_errors(translate=database_errors)
    async def QueryPredictions(
        self, request: pb.QueryPredictionsRequest, context: Context
    ) -> pb.QueryPredictionsResponse:
        rows, token = await self.store.query_predictions(convert.prediction_query_from_pb(request))
        return pb.QueryPredictionsResponse(
            predictions=[convert.prediction_to_pb(r) for r in rows], next_page_token=token
        )

    @rpc_errors(translate=database_errors)
    async def RegisterModelVersion(
        self, request: pb.RegisterModelVersionRequest, context: Context
    ) -> pb.RegisterModelVersionResponse:
        stored, created = await self.store.register_model_version(
            convert.model_version_from_pb(request.model_version),
            if_not_exists=request.if_not_exists,
        )
        return pb.RegisterModelVersionResponse(
            model_version=convert.model_version_to_pb(stored), created=created
        )

    @rpc_errors(translate=database_errors)
    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Context
    ) -> pb.GetModelVersionResponse:
        mv = await self.store.get_model_version(request.model, request.version)
        return pb.GetModelVersionResponse(model_version=convert.model_version_to_pb(mv))

    @rpc_errors(translate=database_errors)
    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        versions = await self.store.list_model_versions(
            request.model,
            status=convert.status_filter_from_pb(request.status),
            summary=request.summary,
        )
        return pb.ListModelVersionsResponse(
            model_versions=[convert.model_version_to_pb(v) for v in versions]
        )

    @rpc_errors(translate=database_errors)
    async def SetModelStatus(
        self, request: pb.SetModelStatusRequest, context: Context
    ) -> pb.SetModelStatusResponse:
        mv = await self.store.set_model_status(
            request.model, request.version, convert.PB_TO_STATUS.get(request.status)
        )
        return pb.SetModelStatusResponse(model_version=convert.model_version_to_pb(mv))

    @rpc_errors(translate=database_errors)
    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.GetStatsResponse:
        stats, mode = await self.store.stats(request.model)
        return pb.GetStatsResponse(
            models=[convert.stats_to_pb(s) for s in stats], storage_mode=mode
        )
