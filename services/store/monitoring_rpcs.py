"""Store RPCs the monitor uses: plans, evaluations, health, metric history, the alert outbox.

Mixed into `StoreServicer`; like it, each method only translates protobuf around one `Store` call.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cyclone import wire
from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from services.store import convert
from services.store.errors import database_errors
from services.store.rpc_area import Context, RpcArea


class MonitoringRpcs(RpcArea):
    @rpc_errors(translate=database_errors)
    async def SavePlan(self, request: pb.SavePlanRequest, context: Context) -> pb.SavePlanResponse:
        return pb.SavePlanResponse(
            revision=await self.store.save_plan(request.model, request.plan_yaml)
        )

    @rpc_errors(translate=database_errors)
    async def GetPlan(self, request: pb.GetPlanRequest, context: Context) -> pb.GetPlanResponse:
        return convert.plan_to_pb(await self.store.get_plan(request.model, request.revision))

    @rpc_errors(translate=database_errors)
    async def RecordEvaluation(
        self, request: pb.RecordEvaluationRequest, context: Context
    ) -> pb.RecordEvaluationResponse:
        outcome = await self.store.record_evaluation(
            convert.evaluation_from_pb(request, datetime.now(UTC))
        )
        return pb.RecordEvaluationResponse(
            previous_level=outcome.previous_level or "",
            level_changed=outcome.level_changed,
            alert_ids=outcome.alert_ids,
        )

    @rpc_errors(translate=database_errors)
    async def GetHealth(
        self, request: pb.GetHealthRequest, context: Context
    ) -> pb.GetHealthResponse:
        health = await self.store.health(request.model)
        return pb.GetHealthResponse(health=[convert.health_to_pb(h) for h in health])

    @rpc_errors(translate=database_errors)
    async def ListMetricPoints(
        self, request: pb.ListMetricPointsRequest, context: Context
    ) -> pb.ListMetricPointsResponse:
        points = await self.store.metric_points(
            request.model,
            wire.from_ts(request, "start"),
            wire.from_ts(request, "end"),
            request.metric,
        )
        return pb.ListMetricPointsResponse(points=[convert.point_to_pb(p) for p in points])

    @rpc_errors(translate=database_errors)
    async def ListPredictionStats(
        self, request: pb.ListPredictionStatsRequest, context: Context
    ) -> pb.ListPredictionStatsResponse:
        stats = await self.store.prediction_stats(
            request.model, wire.from_ts(request, "start"), wire.from_ts(request, "end")
        )
        return pb.ListPredictionStatsResponse(stats=[convert.minute_stats_to_pb(m) for m in stats])

    @rpc_errors(translate=database_errors)
    async def ClaimAlerts(
        self, request: pb.ClaimAlertsRequest, context: Context
    ) -> pb.ClaimAlertsResponse:
        alerts = await self.store.claim_alerts(request.limit, request.lease_seconds)
        return pb.ClaimAlertsResponse(alerts=[convert.alert_to_pb(a) for a in alerts])

    @rpc_errors(translate=database_errors)
    async def CompleteAlert(
        self, request: pb.CompleteAlertRequest, context: Context
    ) -> pb.CompleteAlertResponse:
        await self.store.complete_alert(
            request.alert_id,
            request.delivered,
            request.error,
            wire.from_ts(request, "next_attempt_at"),
        )
        return pb.CompleteAlertResponse()

    @rpc_errors(translate=database_errors)
    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest, context: Context
    ) -> pb.AcknowledgeAlertResponse:
        alert = await self.store.acknowledge_alert(request.alert_id)
        return pb.AcknowledgeAlertResponse(alert=convert.alert_to_pb(alert))

    @rpc_errors(translate=database_errors)
    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: Context
    ) -> pb.ListAlertsResponse:
        alerts = await self.store.list_alerts(request.model, request.status, request.limit)
        return pb.ListAlertsResponse(alerts=[convert.alert_to_pb(a) for a in alerts])
