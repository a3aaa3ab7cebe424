"""`cyclone.monitor.v1.MonitorService`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from cyclone.errors import CycloneError, InvalidArgument, NotFound, Unavailable
from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.server import abort_on_domain_errors
from cyclone.store.v1 import store_service_pb2 as store_pb
from services.monitor.monitor import NAME_TO_PB, Monitor

_STORE_CODES: dict[grpc.StatusCode, type[CycloneError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _from_store(exc: grpc.RpcError) -> CycloneError:
    """The store's status, kept: only an unreachable store is UNAVAILABLE."""
    return _STORE_CODES.get(exc.code(), CycloneError)(f"store: {exc.code().name}: {exc.details()}")


def alert_from_store(record: store_pb.AlertRecord) -> pb.Alert:
    targets = json.loads(record.actions_json or "[]")
    target = targets[0] if targets else {}
    return pb.Alert(
        id=record.id,
        created_at=record.created_at,
        model=record.model,
        version=record.version,
        level=NAME_TO_PB.get(record.level, pb.LEVEL_UNSPECIFIED),
        previous_level=NAME_TO_PB.get(record.previous_level, pb.LEVEL_UNSPECIFIED),
        reasons=[str(r) for r in json.loads(record.reasons_json or "[]")],
        action=str(target.get("action", "")),
        sink=str(target.get("sink", "")),
        status=record.status,
        attempts=record.attempts,
        last_error=record.last_error,
    )


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    async def _call(self, context: aio.ServicerContext[Any, Any], coro: Any) -> Any:
        try:
            return await coro
        except grpc.RpcError as exc:
            await abort_on_domain_errors(context, _from_store(exc))
        except Exception as exc:
            await abort_on_domain_errors(context, exc)

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        statuses = [
            s
            for m, s in sorted(self.monitor.statuses.items())
            if not request.model or m == request.model
        ]
        return pb.GetStatusResponse(statuses=statuses)

    async def EvaluateNow(
        self, request: pb.EvaluateNowRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.EvaluateNowResponse:
        status, alert_ids = await self._call(context, self.monitor.evaluate_model(request.model))
        return pb.EvaluateNowResponse(status=status, alert_ids=alert_ids)

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListAlertsResponse:
        response = await self._call(
            context,
            self.monitor.store.ListAlerts(
                store_pb.ListAlertsRequest(
                    model=request.model, status=request.status, limit=request.limit
                ),
                timeout=10,
            ),
        )
        return pb.ListAlertsResponse(alerts=[alert_from_store(a) for a in response.alerts])

    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.AcknowledgeAlertResponse:
        response = await self._call(
            context,
            self.monitor.store.AcknowledgeAlert(
                store_pb.AcknowledgeAlertRequest(alert_id=request.alert_id), timeout=10
            ),
        )
        return pb.AcknowledgeAlertResponse(alert=alert_from_store(response.alert))

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        async for status in self.monitor.watch(request.model):
            yield pb.WatchStatusResponse(status=status)

    async def SetPlan(
        self, request: pb.SetPlanRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.SetPlanResponse:
        revision = await self._call(
            context, self.monitor.set_plan(request.model, request.plan_yaml)
        )
        return pb.SetPlanResponse(revision=revision)

    async def GetPlan(
        self, request: pb.GetPlanRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetPlanResponse:
        plan_yaml, revision = await self._call(context, self.monitor.get_plan_yaml(request.model))
        return pb.GetPlanResponse(plan_yaml=plan_yaml, revision=revision)
