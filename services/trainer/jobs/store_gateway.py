"""`JobStore` over the store's gRPC API: the one module of the jobs package that touches store
protobufs. Store statuses become the domain's errors here (`JobGone`, `NotFound`,
`StoreFailure`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cyclone import wire
from cyclone.errors import NotFound
from cyclone.models.registration import with_probes
from cyclone.plan import Plan, PlanError, default_plan, parse_plan
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.wire import ts_or_none
from services.trainer.data import LabelledWindow, collect, window_request
from services.trainer.fit import JobFailure

from .model import Champion, Claimed, Job, JobGone, StoreFailure, TrainedVersion

STORE_TIMEOUT = 30.0
T = TypeVar("T")


def job_from_pb(message: store_pb.TrainingJob) -> Job:
    """The store's record (read through `cyclone.wire`, its one conversion) as the domain's."""
    j = wire.job_from_pb(message)
    return Job(
        id=j.id,
        model=j.model,
        state=j.state,
        alert_id=j.alert_id or 0,
        reason=j.reason,
        stage=j.stage,
        message=j.message,
        owner=j.owner,
        new_version=j.new_version or "",
        champion_version=j.champion_version or "",
        family=j.family or "",
        decision=j.decision,
        rollout_id=j.rollout_id or "",
        window_rows=j.window_rows or 0,
        train_rows=j.train_rows or 0,
        holdout_rows=j.holdout_rows or 0,
        window_start=j.window_start,
        window_end=j.window_end,
        champion_metrics=j.champion_metrics or {},
        challenger_metrics=j.challenger_metrics or {},
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        updated_at=j.updated_at,
        lease_expires_at=j.lease_expires_at,
    )


def _update_fields(changes: dict[str, Any]) -> dict[str, Any]:
    """Job field names and values as `UpdateTrainingJobRequest` spells them."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("champion_metrics", "challenger_metrics"):
            out[f"{name}_json"] = json.dumps(value)
        elif isinstance(value, datetime):
            out[name] = ts_or_none(value)
        else:
            out[name] = value
    return out


def version_to_pb(v: TrainedVersion) -> store_pb.ModelVersion:
    return store_pb.ModelVersion(
        model=v.model,
        version=v.version,
        artifact_uri=v.directory,
        sha256=v.sha256,
        schema_json=json.dumps(with_probes(v.schema, v.directory)),
        task=v.task,
        parent_version=v.parent_version,
        training_window_start=ts_or_none(v.window_start),
        training_window_end=ts_or_none(v.window_end),
        triggering_alert_id=v.alert_id,
        evaluation_json=json.dumps(v.evaluation) if v.evaluation else "",
        reference_profile_json=json.dumps(v.reference_profile) if v.reference_profile else "",
        status=store_pb.MODEL_STATUS_STAGED,
        training_rows=v.training_rows,
        family=v.family,
        hyperparameters_json=json.dumps(v.hyperparameters),
        holdout_metrics_json=json.dumps(v.holdout_metrics),
    )


@asynccontextmanager
async def _store_errors(gone: bool = False) -> AsyncIterator[None]:
    """The store's statuses as domain errors; with `gone`, FAILED_PRECONDITION (the job ended
    or was taken over) is `JobGone`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if gone and code == grpc.StatusCode.FAILED_PRECONDITION:
            raise JobGone(details) from None
        raise StoreFailure(code, details) from None


async def _call(call: Awaitable[T], gone: bool = False) -> T:
    async with _store_errors(gone):
        return await call
    raise AssertionError("unreachable")  # pragma: no cover - the context manager re-raises


class StoreJobGateway:
    """Talks to `cyclone.store.v1.StoreService` through `store` (an open stub)."""

    def __init__(self, store: store_grpc.StoreServiceStub, repository: Path) -> None:
        self.store = store
        self.repository = repository

    async def create(
        self, model: str, alert_id: int, reason: str, owner: str, lease_seconds: float
    ) -> tuple[Job, bool]:
        response = await _call(
            self.store.CreateTrainingJob(
                store_pb.CreateTrainingJobRequest(
                    model=model,
                    alert_id=alert_id,
                    reason=reason,
                    owner=owner,
                    lease_seconds=lease_seconds,
                ),
                timeout=STORE_TIMEOUT,
            )
        )
        return job_from_pb(response.job), response.created

    async def get(self, job_id: int) -> Job:
        try:
            response = await self.store.GetTrainingJob(
                store_pb.GetTrainingJobRequest(job_id=job_id), timeout=STORE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or f"job_id: {job_id} not found") from None
            raise StoreFailure(exc.code(), exc.details() or "") from None
        return job_from_pb(response.job)

    async def list_jobs(self, model: str, state: str, limit: int) -> list[Job]:
        response = await _call(
            self.store.ListTrainingJobs(
                store_pb.ListTrainingJobsRequest(model=model, state=state, limit=limit),
                timeout=STORE_TIMEOUT,
            )
        )
        return [job_from_pb(j) for j in response.jobs]

    async def update(
        self, job_id: int, *, expected: str = "running", owner: str = "", **changes: Any
    ) -> Job:
        response = await _call(
            self.store.UpdateTrainingJob(
                store_pb.UpdateTrainingJobRequest(
                    job_id=job_id,
                    expected_state=expected,
                    expected_owner=owner,
                    **_update_fields(changes),
                ),
                timeout=STORE_TIMEOUT,
            ),
            gone=True,
        )
        return job_from_pb(response.job)

    async def heartbeat(self, owner: str, lease_seconds: float) -> list[int]:
        response = await _call(
            self.store.HeartbeatTrainingJobs(
                store_pb.HeartbeatTrainingJobsRequest(owner=owner, lease_seconds=lease_seconds),
                timeout=STORE_TIMEOUT,
            )
        )
        return list(response.job_ids)

    async def claim(self, owner: str, lease_seconds: float, reason: str) -> Claimed:
        response = await _call(
            self.store.ClaimTrainingJobs(
                store_pb.ClaimTrainingJobsRequest(
                    owner=owner, lease_seconds=lease_seconds, reason=reason
                ),
                timeout=STORE_TIMEOUT,
            )
        )
        return Claimed(
            [job_from_pb(j) for j in response.claimed], [job_from_pb(j) for j in response.failed]
        )

    async def champion(self, model: str) -> Champion:
        try:
            response = await self.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=model), timeout=STORE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model: {model!r} is not registered") from None
            raise StoreFailure(exc.code(), exc.details() or "") from None
        mv = response.model_version
        schema = json.loads(mv.schema_json) if mv.schema_json else {}
        features = tuple(
            (str(f["name"]), "categorical" if f.get("kind") == "categorical" else "numeric")
            for f in schema.get("features", [])
        )
        if not features or mv.task not in ("classification", "regression"):
            raise JobFailure(f"model: {model!r} version {mv.version} has no usable schema")
        directory = (
            Path(mv.artifact_uri) if mv.artifact_uri else self.repository / model / mv.version
        )
        return Champion(mv.version, directory, mv.task, features)

    async def plan(self, model: str, task: str) -> Plan:
        try:
            response = await self.store.GetPlan(
                store_pb.GetPlanRequest(model=model), timeout=STORE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return default_plan(model, task)  # type: ignore[arg-type]
            raise StoreFailure(exc.code(), exc.details() or "") from None
        try:
            return parse_plan(response.plan_yaml)
        except PlanError as exc:
            raise JobFailure(f"plan: {'; '.join(exc.problems)}") from None

    async def window(
        self, model: str, champion: Champion, plan: Plan, since: datetime | None = None
    ) -> LabelledWindow:
        request = window_request(model, plan.retrain, datetime.now(UTC), since=since)
        async with _store_errors():
            stream = self.store.GetTrainingData(request, timeout=STORE_TIMEOUT * 4)
            return await collect(stream, champion.features, champion.task)
        raise AssertionError("unreachable")  # pragma: no cover

    async def versions(self, model: str) -> list[str]:
        response = await _call(
            self.store.ListModelVersions(
                store_pb.ListModelVersionsRequest(model=model), timeout=STORE_TIMEOUT
            )
        )
        return [v.version for v in response.model_versions]

    async def register(self, job_id: int, version: TrainedVersion) -> None:
        await _call(
            self.store.RegisterTrainedVersion(
                store_pb.RegisterTrainedVersionRequest(
                    job_id=job_id, model_version=version_to_pb(version)
                ),
                timeout=STORE_TIMEOUT,
            ),
            gone=True,
        )

    async def active_rollout(self, model: str) -> str:
        response = await _call(
            self.store.ListRollouts(
                store_pb.ListRolloutsRequest(model=model, active_only=True, limit=1),
                timeout=STORE_TIMEOUT,
            )
        )
        for rollout in response.rollouts:
            return f"rollout {rollout.id} of version {rollout.to_version}"
        return ""

    async def levels(self, model: str) -> dict[str, str]:
        response = await _call(
            self.store.GetHealth(store_pb.GetHealthRequest(model=model), timeout=STORE_TIMEOUT)
        )
        return {h.version: h.level for h in response.health}


class ServeImmediately:
    """The default rollout: set the new version SERVING in the registry (retires the old one)."""

    def __init__(self, store: store_grpc.StoreServiceStub) -> None:
        self.store = store

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        await self.store.SetModelStatus(
            store_pb.SetModelStatusRequest(
                model=model, version=version, status=store_pb.MODEL_STATUS_SERVING
            ),
            timeout=STORE_TIMEOUT,
        )
        return ""
