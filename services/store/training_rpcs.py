"""Store RPCs the trainer uses: retraining jobs and the registration of retrained versions."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

from google.protobuf.message import Message
from grpc import aio

from cyclone import wire
from cyclone.errors import FailedPrecondition, InvalidArgument, NotFound
from cyclone.models.schema import validate_name
from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from services.store import convert
from services.store.db import AlreadyExistsError, JobEndedError, StoreDB, TrainingJob
from services.store.db.training import JOB_STATES
from services.store.domain import Store
from services.store.errors import database_errors

Context: TypeAlias = aio.ServicerContext[Any, Any]

MAX_JOBS = 1000
_OPTIONAL_TEXT = ("stage", "message", "decision", "rollout_id", "champion_version", "family")
_OPTIONAL_COUNTS = ("window_rows", "train_rows", "holdout_rows")
_TIMES = ("started_at", "finished_at", "window_start", "window_end")
_METRICS = ("champion_metrics", "challenger_metrics")


def job_to_pb(j: TrainingJob) -> pb.TrainingJob:
    return pb.TrainingJob(
        id=j.id,
        model=j.model,
        state=j.state,
        alert_id=j.alert_id or 0,
        reason=j.reason,
        stage=j.stage,
        created_at=wire.ts_or_none(j.created_at),
        started_at=wire.ts_or_none(j.started_at),
        finished_at=wire.ts_or_none(j.finished_at),
        message=j.message,
        new_version=j.new_version or "",
        window_start=wire.ts_or_none(j.window_start),
        window_end=wire.ts_or_none(j.window_end),
        window_rows=j.window_rows or 0,
        train_rows=j.train_rows or 0,
        holdout_rows=j.holdout_rows or 0,
        champion_metrics_json=json.dumps(j.champion_metrics) if j.champion_metrics else "",
        challenger_metrics_json=json.dumps(j.challenger_metrics) if j.challenger_metrics else "",
        decision=j.decision,
        rollout_id=j.rollout_id or "",
        champion_version=j.champion_version or "",
        family=j.family or "",
        owner=j.owner,
        updated_at=wire.ts_or_none(j.updated_at),
        lease_expires_at=wire.ts_or_none(j.lease_expires_at),
    )


def _metrics_json(text: str, field: str) -> dict[str, float]:
    """A JSON object of finite numbers (jsonb rejects NaN, and metrics are numbers)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant) if text else {}
    except ValueError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise InvalidArgument(f"{field}: expected a JSON object of numbers")
    return {str(k): float(v) for k, v in value.items()}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_job_id(job_id: int) -> None:
    if job_id <= 0:
        raise InvalidArgument("job_id: must be positive")


def _check_state(state: str, field: str) -> None:
    if state not in JOB_STATES:
        raise InvalidArgument(f"{field}: expected one of {', '.join(JOB_STATES)}, got {state!r}")


def _changes(request: pb.UpdateTrainingJobRequest) -> dict[str, Any]:
    # Field names come from the tuples above, so look presence up on the untyped message.
    message: Message = request
    changes: dict[str, Any] = {}
    if request.HasField("state"):
        _check_state(request.state, "state")
        changes["state"] = request.state
    for name in _OPTIONAL_TEXT:
        if message.HasField(name):
            changes[name] = getattr(request, name)
    for name in _OPTIONAL_COUNTS:
        if message.HasField(name):
            value = getattr(request, name)
            if value < 0:
                raise InvalidArgument(f"{name}: must not be negative")
            changes[name] = value
    for name in _TIMES:
        when = wire.from_ts(request, name)
        if when is not None:
            changes[name] = when
    for name in _METRICS:
        field = f"{name}_json"
        if message.HasField(field):
            changes[name] = _metrics_json(getattr(request, field), field)
    return changes


class TrainingRpcs:
    """Mixed into StoreServicer, which provides `self.db`."""

    db: StoreDB
    store: Store

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
        _check_job_id(request.job_id)
        if request.expected_state:
            _check_state(request.expected_state, "expected_state")
        changes = _changes(request)
        try:
            if not changes:
                job = await self.db.get_training_job(request.job_id)
                if job is None:
                    raise NotFound(f"job_id: {request.job_id} not found")
            else:
                job = await self.db.update_training_job(
                    request.job_id,
                    changes,
                    request.expected_state or None,
                    request.expected_owner or None,
                )
        except JobEndedError as exc:
            raise FailedPrecondition(str(exc)) from None
        return pb.UpdateTrainingJobResponse(job=job_to_pb(job))

    @rpc_errors(translate=database_errors)
    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: Context
    ) -> pb.GetTrainingJobResponse:
        _check_job_id(request.job_id)
        job = await self.db.get_training_job(request.job_id)
        if job is None:
            raise NotFound(f"job_id: {request.job_id} not found")
        return pb.GetTrainingJobResponse(job=job_to_pb(job))

    @rpc_errors(translate=database_errors)
    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: Context
    ) -> pb.ListTrainingJobsResponse:
        if request.state:
            _check_state(request.state, "state")
        if not 0 <= request.limit <= MAX_JOBS:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_JOBS}")
        jobs = await self.db.list_training_jobs(
            request.model or None, request.state or None, request.limit or 50
        )
        return pb.ListTrainingJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    @rpc_errors(translate=database_errors)
    async def FailOrphanedTrainingJobs(
        self, request: pb.FailOrphanedTrainingJobsRequest, context: Context
    ) -> pb.FailOrphanedTrainingJobsResponse:
        if not request.owner:
            raise InvalidArgument("owner: empty")
        jobs = await self.db.fail_orphaned_training_jobs(
            request.owner, request.reason or "the trainer restarted while the job was unfinished"
        )
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
        _check_job_id(request.job_id)
        if not request.HasField("model_version"):
            raise InvalidArgument("model_version: missing")
        mv = convert.model_version_from_pb(request.model_version)
        try:
            validate_name("model_version.model", mv.model)
            validate_name("model_version.version", mv.version)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not mv.sha256:
            raise InvalidArgument("model_version.sha256: empty")
        if mv.status != "staged":
            raise InvalidArgument("model_version.status: a retrained version starts as staged")
        try:
            stored, job = await self.db.register_trained_version(request.job_id, mv)
        except JobEndedError as exc:
            raise FailedPrecondition(str(exc)) from None
        except AlreadyExistsError:
            raise InvalidArgument(
                f"model_version: {mv.model!r} version {mv.version!r} is already registered"
            ) from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return pb.RegisterTrainedVersionResponse(
            model_version=convert.model_version_to_pb(stored), job=job_to_pb(job)
        )
