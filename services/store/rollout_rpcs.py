"""Store RPCs the trainer's rollout controller uses: create, update, get and list rollouts."""

from __future__ import annotations

import json
import math
from typing import Any, TypeAlias

from grpc import aio

from cyclone import wire
from cyclone.errors import FailedPrecondition, InvalidArgument, NotFound
from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from services.store.db import StoreDB
from services.store.db.rollouts import (
    ROLLOUT_STATES,
    STRATEGIES,
    RolloutConflictError,
    RolloutEventRow,
    RolloutRow,
)
from services.store.errors import database_errors

MAX_LIST = 1000


def _object(text: str, field: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _state(value: str, field: str) -> str:
    if value not in ROLLOUT_STATES:
        raise InvalidArgument(
            f"{field}: expected one of {', '.join(ROLLOUT_STATES)}, got {value!r}"
        )
    return value


def _weight(value: float, field: str) -> float:
    if not 0 <= value <= 100:  # also refuses NaN
        raise InvalidArgument(f"{field}: must be between 0 and 100, got {value}")
    return value


def _event_from_pb(e: pb.RolloutEvent, field: str) -> RolloutEventRow:
    if not e.decision:
        raise InvalidArgument(f"{field}.decision: empty")
    for name, value in e.numbers.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}.numbers[{name}]: must be finite, got {value}")
    return RolloutEventRow(
        state=_state(e.state, f"{field}.state"),
        weight=_weight(e.weight, f"{field}.weight"),
        decision=e.decision,
        reason=e.reason,
        numbers=dict(e.numbers),
        created_at=wire.from_ts(e, "time"),
    )


def rollout_to_pb(r: RolloutRow) -> pb.RolloutRecord:
    return pb.RolloutRecord(
        id=r.id,
        model=r.model,
        from_version=r.from_version or "",
        to_version=r.to_version,
        strategy=r.strategy,
        state=r.state,
        current_weight=r.current_weight,
        weights_json=json.dumps(r.weights),
        reason=r.reason,
        spec_json=json.dumps(r.spec),
        progress_json=json.dumps(r.progress),
        events=[
            pb.RolloutEvent(
                seq=e.seq,
                time=wire.ts_or_none(e.created_at),
                state=e.state,
                weight=e.weight,
                decision=e.decision,
                reason=e.reason,
                numbers=e.numbers,
            )
            for e in r.events
        ],
        created_at=wire.ts_or_none(r.created_at),
        updated_at=wire.ts_or_none(r.updated_at),
    )


def _rollout_id(value: int) -> int:
    if value <= 0:
        raise InvalidArgument("rollout_id: must be positive")
    return value


Context: TypeAlias = aio.ServicerContext[Any, Any]


class RolloutRpcs:
    """Mixed into StoreServicer, which provides `self.db`."""

    db: StoreDB

    @rpc_errors(translate=database_errors)
    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: Context
    ) -> pb.CreateRolloutResponse:
        r = request.rollout
        if not r.model:
            raise InvalidArgument("rollout.model: empty")
        if not r.to_version:
            raise InvalidArgument("rollout.to_version: empty")
        if r.strategy not in STRATEGIES:
            raise InvalidArgument(
                f"rollout.strategy: expected one of {', '.join(STRATEGIES)}, got {r.strategy!r}"
            )
        if not request.HasField("event"):
            raise InvalidArgument("event: missing (a rollout starts with its first event)")
        row = RolloutRow(
            model=r.model,
            to_version=r.to_version,
            strategy=r.strategy,
            state=_state(r.state, "rollout.state"),
            from_version=r.from_version or None,
            current_weight=_weight(r.current_weight, "rollout.current_weight"),
            weights=_object(r.weights_json, "rollout.weights_json") or {},
            reason=r.reason,
            spec=_object(r.spec_json, "rollout.spec_json") or {},
            progress=_object(r.progress_json, "rollout.progress_json") or {},
        )
        event = _event_from_pb(request.event, "event")
        if await self.db.get_model_version(r.model, r.to_version) is None:
            raise NotFound(f"rollout.to_version: model {r.model!r} has no version {r.to_version!r}")
        try:
            created = await self.db.insert_rollout(row, event)
        except RolloutConflictError as exc:
            raise FailedPrecondition(str(exc)) from None
        return pb.CreateRolloutResponse(rollout=rollout_to_pb(created))

    @rpc_errors(translate=database_errors)
    async def UpdateRollout(
        self, request: pb.UpdateRolloutRequest, context: Context
    ) -> pb.UpdateRolloutResponse:
        rollout_id = _rollout_id(request.rollout_id)
        state = _state(request.state, "state")
        weight = _weight(request.current_weight, "current_weight")
        events = [_event_from_pb(e, f"events[{i}]") for i, e in enumerate(request.events)]
        try:
            updated = await self.db.update_rollout_row(
                rollout_id,
                state,
                weight,
                weights=_object(request.weights_json, "weights_json"),
                reason=request.reason or None,
                progress=_object(request.progress_json, "progress_json"),
                events=events,
            )
        except RolloutConflictError as exc:
            raise FailedPrecondition(str(exc)) from None
        return pb.UpdateRolloutResponse(rollout=rollout_to_pb(updated))

    @rpc_errors(translate=database_errors)
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        found = await self.db.get_rollout_row(_rollout_id(request.rollout_id))
        if found is None:
            raise NotFound(f"rollout_id: rollout {request.rollout_id} not found")
        return pb.GetRolloutResponse(rollout=rollout_to_pb(found))

    @rpc_errors(translate=database_errors)
    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        if not 0 <= request.limit <= MAX_LIST:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST}")
        rows = await self.db.list_rollout_rows(
            request.model or None, request.active_only, request.limit or 50
        )
        return pb.ListRolloutsResponse(rollouts=[rollout_to_pb(r) for r in rows])
