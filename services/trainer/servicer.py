"""`cyclone.trainer.v1.TrainerService`: translates protobuf <-> the job runner (retraining) and
the rollout controller (traffic), through `convert.py`; without a router the rollout RPCs fail
with FAILED_PRECONDITION, on a standby trainer (another one leads the traffic plane) with
UNAVAILABLE naming the leader."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from cyclone.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotLeader,
)
from cyclone.rpc_errors import rpc_errors, upstream
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer import convert
from services.trainer.jobs import JobRunner
from services.trainer.leader import LeaderElection
from services.trainer.rollout import RolloutController
from services.trainer.traffic import TrafficPlane

Context: TypeAlias = aio.ServicerContext[Any, Any]
MAX_LIST = 1000

# The store's status passes through, its details say it came from the store.
store_errors = upstream("store")


def _rollout_id(value: str) -> str:
    """Rollout ids are the store's positive integers, sent as text."""
    if not value:
        raise InvalidArgument("rollout_id: empty")
    if not value.isdigit() or int(value) <= 0:
        raise InvalidArgument(f"rollout_id: expected a positive integer, got {value!r}")
    return value


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(
        self,
        runner: JobRunner,
        traffic: TrafficPlane | None = None,
        election: LeaderElection | None = None,
    ) -> None:
        self.runner = runner
        self.traffic = traffic
        self.election = election

    @rpc_errors(translate=store_errors)
    async def Retrain(self, request: pb.RetrainRequest, context: Context) -> pb.RetrainResponse:
        job, created = await self.runner.retrain(request.model, request.alert_id, request.reason)
        return pb.RetrainResponse(job=convert.job_to_pb(job), created=created)

    @rpc_errors(translate=store_errors)
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=convert.job_to_pb(await self.runner.get(request.job_id)))

    @rpc_errors(translate=store_errors)
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        if not 0 <= request.limit <= MAX_LIST:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST}")
        state = ""
        if request.state != pb.JOB_STATE_UNSPECIFIED:
            state = convert.job_state_from_pb(request.state)
        jobs = await self.runner.list(request.model, state, request.limit or 50)
        return pb.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in jobs])

    @rpc_errors(translate=store_errors)
    async def WatchJob(self, request: pb.WatchJobRequest, context: Context) -> Any:
        async for job in self.runner.watch(request.job_id):
            yield pb.WatchJobResponse(job=convert.job_to_pb(job))

    @rpc_errors(translate=store_errors)
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=convert.job_to_pb(await self.runner.cancel(request.job_id)))

    @rpc_errors(translate=store_errors)
    async def Rollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutResponse:
        strategy = convert.strategy_from_pb(request.strategy)
        self._controller("Rollout")
        assert self.traffic is not None
        started = await self.traffic.rollout(request.model, request.version, strategy)
        return pb.RolloutResponse(rollout=convert.rollout_to_pb(started))

    @rpc_errors(translate=store_errors)
    async def Promote(self, request: pb.PromoteRequest, context: Context) -> pb.PromoteResponse:
        promoted = await self._controller("Promote").promote(_rollout_id(request.rollout_id))
        return pb.PromoteResponse(rollout=convert.rollout_to_pb(promoted))

    @rpc_errors(translate=store_errors)
    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.RollbackResponse:
        controller = self._controller("Rollback")
        rollout_id = _rollout_id(request.rollout_id) if request.rollout_id else ""
        reason = request.reason or (
            f"rollback requested by alert {request.alert_id}" if request.alert_id else "by hand"
        )
        if rollout_id:
            rolled_back = await controller.rollback(rollout_id, reason)
        elif not request.model:
            raise InvalidArgument("model: empty (name the model or the rollout_id)")
        else:
            key = f"alert {request.alert_id}" if request.alert_id else ""
            rolled_back = await controller.revert(request.model, reason, key)
        return pb.RollbackResponse(rollout=convert.rollout_to_pb(rolled_back))

    @rpc_errors(translate=store_errors)
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        found = await self._controller("GetRollout").get(_rollout_id(request.rollout_id))
        return pb.GetRolloutResponse(rollout=convert.rollout_to_pb(found))

    @rpc_errors(translate=store_errors)
    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        if not 0 <= request.limit <= MAX_LIST:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST}")
        state = convert.state_from_pb(request.state)
        listed = await self._controller("ListRollouts").list(
            request.model or None, request.limit or 50
        )
        return pb.ListRolloutsResponse(
            rollouts=[convert.rollout_to_pb(r) for r in listed if state is None or r.state == state]
        )

    @rpc_errors(translate=store_errors)
    async def WatchRollout(self, request: pb.WatchRolloutRequest, context: Context) -> Any:
        controller = self._controller("WatchRollout")
        rollout_id = _rollout_id(request.rollout_id)
        async for step in controller.watch(rollout_id):
            current = await controller.get(rollout_id)
            yield pb.WatchRolloutResponse(
                rollout=convert.rollout_to_pb(current), step=convert.step_to_pb(step)
            )

    def _controller(self, rpc: str) -> RolloutController:
        if self.traffic is None:
            raise FailedPrecondition(
                f"{rpc}: this trainer runs without a router (start it with --envoy, as "
                "`cyclone up` does) so it cannot move traffic"
            )
        controller = self.traffic.controller
        if controller is None:
            leader = self.election.describe_leader() if self.election else "none"
            raise NotLeader(
                f"{rpc}: this trainer is a standby; the traffic plane's leader is {leader}"
                " (retry: through Envoy's control listener calls reach the leader)"
            )
        return controller
