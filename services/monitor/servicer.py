"""`cyclone.monitor.v1.MonitorService`: protobuf in, one `Monitor` call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from grpc import aio

from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.rpc_errors import rpc_errors, upstream
from services.monitor import convert
from services.monitor.monitor import Monitor

Context: TypeAlias = aio.ServicerContext[Any, Any]


# The store's status passes through, its details say it came from the store.
store_errors = upstream("store")


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    @rpc_errors(translate=store_errors)
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        statuses = self.monitor.latest(request.model)
        return pb.GetStatusResponse(statuses=[convert.status_to_pb(s) for s in statuses])

    @rpc_errors(translate=store_errors)
    async def EvaluateNow(
        self, request: pb.EvaluateNowRequest, context: Context
    ) -> pb.EvaluateNowResponse:
        status, alert_ids = await self.monitor.evaluate_model(request.model)
        return pb.EvaluateNowResponse(status=convert.status_to_pb(status), alert_ids=alert_ids)

    @rpc_errors(translate=store_errors)
    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Context
    ) -> pb.ListAlertsResponse:
        alerts = await self.monitor.list_alerts(request.model, request.status, request.limit)
        return pb.ListAlertsResponse(alerts=[convert.alert_to_pb(a) for a in alerts])

    @rpc_errors(translate=store_errors)
    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest, context: Context
    ) -> pb.AcknowledgeAlertResponse:
        alert = await self.monitor.acknowledge_alert(request.alert_id)
        return pb.AcknowledgeAlertResponse(alert=convert.alert_to_pb(alert))

    @rpc_errors(translate=store_errors)
    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: Context
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        async for status in self.monitor.watch(request.model):
            yield pb.WatchStatusResponse(status=convert.status_to_pb(status))

    @rpc_errors(translate=store_errors)
    async def SetPlan(self, request: pb.SetPlanRequest, context: Context) -> pb.SetPlanResponse:
        revision = await self.monitor.set_plan(request.model, request.plan_yaml)
        return pb.SetPlanResponse(revision=revision)

    @rpc_errors(translate=store_errors)
    async def GetPlan(self, request: pb.GetPlanRequest, context: Context) -> pb.GetPlanResponse:
        plan_yaml, revision = await self.monitor.get_plan_yaml(request.model)
        return pb.GetPlanResponse(plan_yaml=plan_yaml, revision=revision)
