"""`RolloutStore` over the store's gRPC API: registry, plans, labelled rows and `rollouts`."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import yaml
from grpc import aio

from cyclone.channels import aio_channel
from cyclone.errors import FailedPrecondition, NotFound, NotLeader
from cyclone.rollout_plan import RolloutSpec, parse_rollout, rollout_to_dict
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from cyclone.wire import ts

from .model import Progress, Rollout, RolloutState, RolloutStep
from .ports import Rows, VersionInfo

_STATUS = {
    pb.MODEL_STATUS_STAGED: "staged",
    pb.MODEL_STATUS_CANARY: "canary",
    pb.MODEL_STATUS_SERVING: "serving",
    pb.MODEL_STATUS_RETIRED: "retired",
}
_TO_STATUS = {v: k for k, v in _STATUS.items()}


def step_to_pb(step: RolloutStep) -> pb.RolloutEvent:
    return pb.RolloutEvent(
        time=ts(step.time),
        state=step.state.value,
        weight=step.weight,
        decision=step.decision,
        reason=step.reason,
        numbers={k: v for k, v in step.numbers.items() if math.isfinite(v)},
    )


def rollout_from_pb(r: pb.RolloutRecord) -> Rollout:
    return Rollout(
        id=str(r.id),
        model=r.model,
        from_version=r.from_version or None,
        to_version=r.to_version,
        spec=parse_rollout(json.loads(r.spec_json or "{}"), "spec_json"),
        state=RolloutState(r.state),
        weight=r.current_weight,
        weights={str(k): int(v) for k, v in json.loads(r.weights_json or "{}").items()},
        reason=r.reason,
        progress=Progress.from_dict(json.loads(r.progress_json or "{}")),
        steps=[
            RolloutStep(
                time=e.time.ToDatetime(tzinfo=UTC),
                state=RolloutState(e.state),
                weight=e.weight,
                decision=e.decision,
                reason=e.reason,
                numbers=dict(e.numbers),
            )
            for e in r.events
        ],
        created_at=r.created_at.ToDatetime(tzinfo=UTC) if r.HasField("created_at") else None,
        updated_at=r.updated_at.ToDatetime(tzinfo=UTC) if r.HasField("updated_at") else None,
    )


def _row_key(features: dict[str, Any], i: int) -> str:
    return json.dumps({name: col[i] for name, col in features.items()}, sort_keys=True)


async def _unfenced() -> pb.RoleFence | None:
    return None


class StoreGateway:
    """Talks to `cyclone.store.v1.StoreService` at `address`."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        *,
        fence: Callable[[], Awaitable[pb.RoleFence | None]] | None = None,
    ) -> None:
        self.channel = aio_channel(address)
        self.stub = pb_grpc.StoreServiceStub(self.channel)
        self.timeout = timeout
        # The leading trainer's role lease: rollout writes carry it and the store refuses them
        # once another trainer took the lead (None: unfenced, a lone trainer without election).
        self.fence = fence or _unfenced

    def _fenced(self, exc: aio.AioRpcError) -> bool:
        return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (
            exc.details() or ""
        ).startswith("fence:")

    async def close(self) -> None:
        await self.channel.close()

    async def model_version(self, model: str, version: str) -> VersionInfo | None:
        try:
            reply = await self.stub.GetModelVersion(
                pb.GetModelVersionRequest(model=model, version=version), timeout=self.timeout
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        mv = reply.model_version
        return VersionInfo(mv.model, mv.version, _STATUS.get(mv.status, "staged"), mv.task)

    async def serving_version(self, model: str) -> str | None:
        reply = await self.stub.ListModelVersions(
            pb.ListModelVersionsRequest(model=model), timeout=self.timeout
        )
        return next(
            (v.version for v in reply.model_versions if v.status == pb.MODEL_STATUS_SERVING), None
        )

    async def registered(self, model: str | None = None) -> list[VersionInfo]:
        reply = await self.stub.ListModelVersions(
            pb.ListModelVersionsRequest(model=model or ""), timeout=self.timeout
        )
        return [
            VersionInfo(v.model, v.version, _STATUS.get(v.status, "staged"), v.task)
            for v in reply.model_versions
        ]

    async def set_status(self, model: str, version: str, status: str) -> None:
        await self.stub.SetModelStatus(
            pb.SetModelStatusRequest(model=model, version=version, status=_TO_STATUS[status]),
            timeout=self.timeout,
        )

    async def rollout_spec(self, model: str) -> RolloutSpec:
        try:
            reply = await self.stub.GetPlan(pb.GetPlanRequest(model=model), timeout=self.timeout)
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return RolloutSpec()
            raise
        data = yaml.safe_load(reply.plan_yaml) or {}
        return parse_rollout(data.get("rollout") if isinstance(data, dict) else None)

    async def rows(self, model: str, version: str, since: datetime) -> Rows:
        keys: list[str] = []
        predictions: list[Any] = []
        labels: list[Any] = []
        probabilities: list[list[float]] = []
        classes: list[str] = []
        call = self.stub.GetTrainingData(
            pb.GetTrainingDataRequest(
                model=model, version=version, start=ts(since), include_unlabelled=True
            ),
            timeout=self.timeout,
        )
        async for chunk in call:
            n = len(chunk.prediction_ids)
            features = {
                name: list(col.strings) or [None if math.isnan(x) else x for x in col.numbers]
                for name, col in chunk.features.items()
            }
            preds: list[Any] = list(chunk.predictions.strings) or list(chunk.predictions.numbers)
            truth: list[Any] = list(chunk.labels.strings) or list(chunk.labels.numbers)
            flags = list(chunk.labelled) or [True] * n
            for i in range(n):
                keys.append(_row_key(features, i))
                predictions.append(preds[i] if i < len(preds) else None)
                labels.append(truth[i] if flags[i] and i < len(truth) else None)
            k = len(chunk.class_labels)
            if (
                k
                and len(chunk.probabilities) == n * k
                and (not classes or classes == list(chunk.class_labels))
            ):
                classes = list(chunk.class_labels)
                flat = list(chunk.probabilities)
                probabilities += [flat[i * k : (i + 1) * k] for i in range(n)]
        complete = bool(classes) and len(probabilities) == len(keys)
        return Rows(
            keys,
            predictions,
            labels,
            probabilities if complete else None,
            classes if complete else (),
        )

    async def create(self, rollout: Rollout, first: RolloutStep) -> Rollout:
        try:
            reply = await self.stub.CreateRollout(
                pb.CreateRolloutRequest(
                    rollout=self._record(rollout), event=step_to_pb(first), fence=await self.fence()
                ),
                timeout=self.timeout,
            )
        except aio.AioRpcError as exc:
            if self._fenced(exc):
                raise NotLeader(exc.details() or "fenced") from None
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(exc.details() or "model has an active rollout") from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or "version not found") from None
            raise
        created = rollout_from_pb(reply.rollout)
        rollout.id, rollout.steps = created.id, created.steps
        rollout.created_at = rollout.updated_at = created.created_at
        return rollout

    async def save(self, rollout: Rollout, steps: Sequence[RolloutStep]) -> None:
        try:
            await self.stub.UpdateRollout(
                pb.UpdateRolloutRequest(
                    rollout_id=int(rollout.id),
                    state=rollout.state.value,
                    current_weight=rollout.weight,
                    weights_json=json.dumps(rollout.weights),
                    reason=rollout.reason,
                    progress_json=json.dumps(rollout.progress.to_dict()),
                    events=[step_to_pb(s) for s in steps],
                    fence=await self.fence(),
                ),
                timeout=self.timeout,
            )
        except aio.AioRpcError as exc:
            if self._fenced(exc):
                raise NotLeader(exc.details() or "fenced") from None
            raise

    async def get(self, rollout_id: str) -> Rollout | None:
        if not rollout_id.isdigit():
            return None
        try:
            reply = await self.stub.GetRollout(
                pb.GetRolloutRequest(rollout_id=int(rollout_id)), timeout=self.timeout
            )
        except aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise
        return rollout_from_pb(reply.rollout)

    async def list(
        self, model: str | None = None, active_only: bool = False, limit: int = 50
    ) -> list[Rollout]:
        reply = await self.stub.ListRollouts(
            pb.ListRolloutsRequest(model=model or "", active_only=active_only, limit=limit),
            timeout=self.timeout,
        )
        return [rollout_from_pb(r) for r in reply.rollouts]

    @staticmethod
    def _record(r: Rollout) -> pb.RolloutRecord:
        return pb.RolloutRecord(
            model=r.model,
            from_version=r.from_version or "",
            to_version=r.to_version,
            strategy=r.spec.strategy,
            state=r.state.value,
            current_weight=r.weight,
            weights_json=json.dumps(r.weights),
            reason=r.reason,
            spec_json=json.dumps(rollout_to_dict(r.spec)),
            progress_json=json.dumps(r.progress.to_dict()),
        )
