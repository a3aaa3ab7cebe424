"""Store RPCs the trainer uses: retraining jobs and the registration of retrained versions.

Mixed into `StoreServicer`; like it, each method only translates protobuf around one `Store` call.
A job goes out through `cyclone.wire.job_to_pb`, the one conversion of the job record, which the
trainer and the monitor read back with `wire.job_from_pb`.
"""

from __future__ import annotations

from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.wire import job_to_pb
from services.store import convert
from services.store.errors import database_errors
from services.store.rpc_area import Context, RpcArea


class TrainingRpcs(RpcArea):
    @rpc_errors(translate=database_errors)
    async def CreateTrainingJob(
        self, request: pb.CreateTrainingJobRequest, context: Context
    ) -> pb.CreateTrainingJobResponse:
        job, created = await self.store.create_training_job(
            request.model, request.alert_id, request.reason, request.owner, request.lease_seconds
        )
        return pb.CreateTrainingJobResponse(job=job_to_pb(job), created=created)

    @rpc_errors(translate=database_errors)
    async def UpdateTrainingJob(
        self, request: pb.UpdateTrainingJobRequest, context: Context
    ) -> pb.UpdateTrainingJobResponse:
        job = await self.store.update_training_job(convert.job_update_from_pb(request))
        return pb.UpdateTrainingJobResponse(job=job_to_pb(job))

    @rpc_errors(translate=database_errors)
    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: Context
    ) -> pb.GetTrainingJobResponse:
        job = await self.store.get_training_job(request.job_id)
        return pb.GetTrainingJobResponse(job=job_to_pb(job))

    @rpc_errors(translate=database_errors)
    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: Context
    ) -> pb.ListTrainingJobsResponse:
        jobs = await self.store.list_training_jobs(request.model, request.state, request.limit)
        return pb.ListTrainingJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    @rpc_errors(translate=database_errors)
    async def FailOrphanedTrainingJobs(
        self, request: pb.FailOrphanedTrainingJobsRequest, context: Context
    ) -> pb.FailOrphanedTrainingJobsResponse:
        jobs = await self.store.fail_orphaned_training_jobs(request.owner, request.reason)
        return pb.FailOrphanedTrainingJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    @rpc_errors(translate=database_errors)
    async def HeartbeatTrainingJobs(
        self, request: pb.HeartbeatTrainingJobsRequest, context: Context
    ) -> pb.HeartbeatTrainingJobsResponse:
        ids = await self.store.heartbeat_training_jobs(request.owner, request.lease_seconds)
        return pb.HeartbeatTrainingJobsResponse(job_ids=ids)

    @rpc_errors(translate=database_errors)
    async def ClaimTrainingJobs(
        self, request: pb.ClaimTrainingJobsRequest, context: Context
    ) -> pb.ClaimTrainingJobsResponse:
        claimed, failed = await self.store.claim_training_jobs(
            request.owner, request.lease_seconds, request.reason, request.limit
        )
        return pb.ClaimTrainingJobsResponse(
            claimed=[job_to_pb(j) for j in claimed], failed=[job_to_pb(j) for j in failed]
        )

    @rpc_errors(translate=database_errors)
    async def RegisterTrainedVersion(
        self, request: pb.RegisterTrainedVersionRequest, context: Context
    ) -> pb.RegisterTrainedVersionResponse:
        stored, job = await self.store.register_trained_version(
            request.job_id, convert.trained_version_from_pb(request)
        )
        return pb.RegisterTrainedVersionResponse(
            model_version=convert.model_version_to_pb(stored), job=job_to_pb(job)
        )
