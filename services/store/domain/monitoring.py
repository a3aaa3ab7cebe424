"""What the monitor keeps in the store: plans, evaluations and their levels, health, metric
history, per-minute traffic, and the alert outbox it delivers from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cyclone.errors import InvalidArgument
from services.store.db import (
    Alert,
    EvaluationOutcome,
    Health,
    MetricPoint,
    MinuteStats,
    Plan,
    StoreDB,
)

from .checks import check_window, found, limit, not_negative, one_of, positive, require, traceparent
from .registry import require_known_model

MAX_CLAIM = 1000
# Per-minute traffic over more than this is a report, not a chart.
MAX_STATS_SPAN = timedelta(days=31)
LEVELS = ("GREEN", "AMBER", "RED")
ALERT_STATUSES = ("pending", "failed", "delivered", "acknowledged", "dead")


@dataclass(frozen=True)
class EvaluationRecord:
    model: str
    version: str
    level: str
    reasons: list[Any]
    summary: dict[str, Any]
    points: list[MetricPoint]
    alerts: list[Alert]
    # Recorded only while this monitor holds the model's lease ("": unconditionally).
    lease_holder: str = ""


class MonitoringArea:
    db: StoreDB

    async def save_plan(self, model: str, plan_yaml: str) -> int:
        require("model", model)
        require("plan_yaml", plan_yaml.strip())
        return await self.db.save_plan(model, plan_yaml)

    async def get_plan(self, model: str, revision: int) -> Plan:
        require("model", model)
        not_negative("revision", revision)
        return found(
            await self.db.get_plan(model, revision or None),
            f"model: {model!r} has no monitoring plan"
            + (f" revision {revision}" if revision else ""),
        )

    async def record_evaluation(self, ev: EvaluationRecord) -> EvaluationOutcome:
        require("model", ev.model)
        require("version", ev.version)
        one_of("level", ev.level, LEVELS)
        for i, alert in enumerate(ev.alerts):
            traceparent(f"alerts[{i}].traceparent", alert.traceparent)
        return await self.db.record_evaluation(
            ev.model,
            ev.version,
            ev.level,
            ev.reasons,
            ev.summary,
            ev.points,
            ev.alerts,
            lease_holder=ev.lease_holder or None,
        )

    async def health(self, model: str) -> list[Health]:
        return await self.db.health(model or None)

    async def metric_points(
        self, model: str, start: datetime | None, end: datetime | None, metric: str
    ) -> list[MetricPoint]:
        """Points in [start, end), by default the last day."""
        require("model", model)
        end = end or datetime.now(UTC) + timedelta(seconds=1)
        start = start or end - timedelta(days=1)
        check_window(start, end)
        return await self.db.metric_points(model, start, end, metric or None)

    async def prediction_stats(
        self, model: str, start: datetime | None, end: datetime | None
    ) -> list[MinuteStats]:
        """Traffic and latency per version and minute in [start, end), by default the last hour."""
        require("model", model)
        end = end or datetime.now(UTC) + timedelta(seconds=1)
        start = start or end - timedelta(hours=1)
        check_window(start, end)
        if end - start > MAX_STATS_SPAN:
            raise InvalidArgument(f"start: the span must be at most {MAX_STATS_SPAN.days} days")
        return await self.db.prediction_stats(model, start, end)

    # -- the alert outbox -----------------------------------------------------------------------

    async def claim_alerts(self, max_alerts: int, lease_seconds: int) -> list[Alert]:
        claim = limit("limit", max_alerts, MAX_CLAIM, 100)
        not_negative("lease_seconds", lease_seconds)
        return await self.db.due_alerts(
            datetime.now(UTC), claim, timedelta(seconds=lease_seconds or 60)
        )

    async def complete_alert(
        self, alert_id: int, delivered: bool, error: str, next_attempt_at: datetime | None
    ) -> None:
        positive("alert_id", alert_id)
        if delivered:
            await self.db.mark_alert_delivered(alert_id)
        else:
            await self.db.mark_alert_failed(alert_id, error or "unknown error", next_attempt_at)

    async def acknowledge_alert(self, alert_id: int) -> Alert:
        positive("alert_id", alert_id)
        await self.db.acknowledge_alert(alert_id)
        return found(await self.db.get_alert(alert_id), f"alert_id: {alert_id} not found")

    async def list_alerts(self, model: str, status: str, max_alerts: int) -> list[Alert]:
        if status:
            one_of("status", status, ALERT_STATUSES)
        count = limit("limit", max_alerts, MAX_CLAIM, 100)
        alerts = await self.db.list_alerts(model or None, status or None, count)
        if not alerts:
            await require_known_model(self.db, model)
        return alerts
