"""Store RPCs the monitor uses: plans, evaluations, health, metric history, the alert outbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from cyclone.errors import InvalidArgument, NotFound
from cyclone.store.v1 import store_service_pb2 as pb
from services.store import convert
from services.store.db import Alert, MetricPoint, StoreDB
from services.store.guard import store_rpc

LEVELS = ("GREEN", "AMBER", "RED")
ALERT_STATUSES = ("pending", "failed", "delivered", "acknowledged", "dead")
MAX_CLAIM = 1000


def _json(text: str, field: str, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and PostgreSQL's jsonb) does not.
    raise ValueError(f"{name} is not a JSON value")


def alert_to_pb(a: Alert) -> pb.AlertRecord:
    return pb.AlertRecord(
        id=a.id or 0,
        created_at=convert.ts(a.created_at),
        model=a.model,
        version=a.version or "",
        level=a.level,
        previous_level=a.previous_level or "",
        reasons_json=json.dumps(a.reasons),
        actions_json=json.dumps(a.actions),
        status=a.status,
        attempts=a.attempts,
        last_error=a.last_error or "",
    )


def point_to_pb(p: MetricPoint) -> pb.MetricPoint:
    return pb.MetricPoint(
        created_at=convert.ts(p.created_at),
        model=p.model,
        version=p.version or "",
        metric=p.metric,
        value=p.value,
        level=p.level or "",
        details_json=json.dumps(p.details) if p.details is not None else "",
    )


def _check_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model: empty")


class MonitoringRpcs:
    """Mixed into StoreServicer, which provides `self.db`."""

    db: StoreDB

    @store_rpc
    async def SavePlan(self, request: pb.SavePlanRequest) -> pb.SavePlanResponse:
        _check_model(request.model)
        if not request.plan_yaml.strip():
            raise InvalidArgument("plan_yaml: empty")
        return pb.SavePlanResponse(
            revision=await self.db.save_plan(request.model, request.plan_yaml)
        )

    @store_rpc
    async def GetPlan(self, request: pb.GetPlanRequest) -> pb.GetPlanResponse:
        _check_model(request.model)
        if request.revision < 0:
            raise InvalidArgument("revision: must not be negative")
        plan = await self.db.get_plan(request.model, request.revision or None)
        if plan is None:
            raise NotFound(
                f"model: {request.model!r} has no monitoring plan"
                + (f" revision {request.revision}" if request.revision else "")
            )
        return pb.GetPlanResponse(
            model=plan.model,
            revision=plan.revision,
            plan_yaml=plan.plan_yaml,
            created_at=convert.ts(plan.created_at),
        )

    @store_rpc
    async def RecordEvaluation(
        self, request: pb.RecordEvaluationRequest
    ) -> pb.RecordEvaluationResponse:
        _check_model(request.model)
        if not request.version:
            raise InvalidArgument("version: empty")
        if request.level not in LEVELS:
            raise InvalidArgument(
                f"level: expected one of {', '.join(LEVELS)}, got {request.level!r}"
            )
        now = datetime.now(UTC)
        points = [
            MetricPoint(
                created_at=convert.from_ts(p, "created_at") or now,
                model=request.model,
                version=request.version,
                metric=p.metric,
                value=p.value if p.HasField("value") else None,
                level=request.level,
                details=_json(p.details_json, f"points[{i}].details_json", None),
            )
            for i, p in enumerate(request.points)
        ]
        alerts = [
            Alert(
                model=request.model,
                version=request.version,
                level=request.level,
                previous_level=a.previous_level or None,
                reasons=_json(a.reasons_json, f"alerts[{i}].reasons_json", []),
                actions=_json(a.actions_json, f"alerts[{i}].actions_json", []),
            )
            for i, a in enumerate(request.alerts)
        ]
        outcome = await self.db.record_evaluation(
            request.model,
            request.version,
            request.level,
            _json(request.reasons_json, "reasons_json", []),
            _json(request.summary_json, "summary_json", {}),
            points,
            alerts,
        )
        return pb.RecordEvaluationResponse(
            previous_level=outcome.previous_level or "",
            level_changed=outcome.level_changed,
            alert_ids=outcome.alert_ids,
        )

    @store_rpc
    async def GetHealth(self, request: pb.GetHealthRequest) -> pb.GetHealthResponse:
        return pb.GetHealthResponse(
            health=[
                pb.ModelHealth(
                    model=h.model,
                    version=h.version,
                    level=h.level,
                    reasons_json=json.dumps(h.reasons),
                    summary_json=json.dumps(h.summary),
                    evaluated_at=convert.ts(h.evaluated_at),
                    changed_at=convert.ts(h.changed_at),
                )
                for h in await self.db.health(request.model or None)
            ]
        )

    @store_rpc
    async def ListMetricPoints(
        self, request: pb.ListMetricPointsRequest
    ) -> pb.ListMetricPointsResponse:
        _check_model(request.model)
        end = convert.from_ts(request, "end") or datetime.now(UTC) + timedelta(seconds=1)
        start = convert.from_ts(request, "start") or end - timedelta(days=1)
        if end <= start:
            raise InvalidArgument("end: must be after start")
        points = await self.db.metric_points(request.model, start, end, request.metric or None)
        return pb.ListMetricPointsResponse(points=[point_to_pb(p) for p in points])

    @store_rpc
    async def ClaimAlerts(self, request: pb.ClaimAlertsRequest) -> pb.ClaimAlertsResponse:
        if not 0 <= request.limit <= MAX_CLAIM:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_CLAIM}")
        if request.lease_seconds < 0:
            raise InvalidArgument("lease_seconds: must not be negative")
        alerts = await self.db.due_alerts(
            datetime.now(UTC), request.limit or 100, timedelta(seconds=request.lease_seconds or 60)
        )
        return pb.ClaimAlertsResponse(alerts=[alert_to_pb(a) for a in alerts])

    @store_rpc
    async def CompleteAlert(self, request: pb.CompleteAlertRequest) -> pb.CompleteAlertResponse:
        if request.alert_id <= 0:
            raise InvalidArgument("alert_id: must be positive")
        if request.delivered:
            await self.db.mark_alert_delivered(request.alert_id)
        else:
            await self.db.mark_alert_failed(
                request.alert_id,
                request.error or "unknown error",
                convert.from_ts(request, "next_attempt_at"),
            )
        return pb.CompleteAlertResponse()

    @store_rpc
    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest
    ) -> pb.AcknowledgeAlertResponse:
        if request.alert_id <= 0:
            raise InvalidArgument("alert_id: must be positive")
        await self.db.acknowledge_alert(request.alert_id)
        alert = await self.db.get_alert(request.alert_id)
        if alert is None:
            raise NotFound(f"alert_id: {request.alert_id} not found")
        return pb.AcknowledgeAlertResponse(alert=alert_to_pb(alert))

    @store_rpc
    async def ListAlerts(self, request: pb.ListAlertsRequest) -> pb.ListAlertsResponse:
        if request.status and request.status not in ALERT_STATUSES:
            raise InvalidArgument(
                f"status: expected one of {', '.join(ALERT_STATUSES)}, got {request.status!r}"
            )
        if not 0 <= request.limit <= MAX_CLAIM:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_CLAIM}")
        alerts = await self.db.list_alerts(
            request.model or None, request.status or None, request.limit or 100
        )
        return pb.ListAlertsResponse(alerts=[alert_to_pb(a) for a in alerts])
