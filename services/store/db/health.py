"""The monitor's persisted state: current level per model version, evaluations, alerts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from ._base import StoreBase
from .leases import check_lease
from .types import Alert, MetricPoint


@dataclass(frozen=True)
class Health:
    model: str
    version: str
    level: str
    reasons: list[Any]
    summary: dict[str, Any]
    evaluated_at: datetime
    changed_at: datetime


@dataclass(frozen=True)
class EvaluationOutcome:
    previous_level: str | None
    level_changed: bool
    alert_ids: list[int]


_HEALTH_COLS = "model, version, level, reasons, summary, evaluated_at, changed_at"


class HealthMixin(StoreBase):
    async def record_evaluation(
        self,
        model: str,
        version: str,
        level: str,
        reasons: list[Any],
        summary: dict[str, Any],
        points: Sequence[MetricPoint],
        alerts: Sequence[Alert],
        *,
        lease_holder: str | None = None,
    ) -> EvaluationOutcome:
        """Store one evaluation; on a level change also queue `alerts`, atomically.

        The row lock on model_health serialises concurrent monitors, so one level change
        raises its alerts exactly once. With `lease_holder`, only while that holder holds the
        model's lease (the lease row stays locked until commit, so it cannot be released or
        taken meanwhile).
        """
        async with self.transaction() as conn:
            if lease_holder is not None:
                await check_lease(conn, model, lease_holder)
            cur = await conn.execute(
                "SELECT level FROM model_health WHERE model = %s AND version = %s FOR UPDATE",
                (model, version),
            )
            row = await cur.fetchone()
            previous = str(row[0]) if row else None
            # A first evaluation that is GREEN is not news; anything else is a change.
            changed = previous != level and not (previous is None and level == "GREEN")
            await conn.execute(
                "INSERT INTO model_health (model, version, level, reasons, summary)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (model, version) DO UPDATE SET"
                " level = EXCLUDED.level, reasons = EXCLUDED.reasons, summary = EXCLUDED.summary,"
                " evaluated_at = now(), changed_at = CASE WHEN model_health.level = EXCLUDED.level"
                " THEN model_health.changed_at ELSE now() END",
                (model, version, level, Jsonb(reasons), Jsonb(summary)),
            )
            ids: list[int] = []
            if points:
                await self.insert_metric_points(points, conn=conn)  # type: ignore[attr-defined]
            if changed:
                for alert in alerts:
                    alert = replace(alert, level=level, previous_level=previous)
                    ids.append(await self.insert_alert(alert, conn=conn))  # type: ignore[attr-defined]
        return EvaluationOutcome(previous, changed, ids)

    async def health(self, model: str | None = None) -> list[Health]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT " + _HEALTH_COLS + " FROM model_health"
                " WHERE (%(m)s::text IS NULL OR model = %(m)s::text) ORDER BY model, version",
                {"m": model},
            )
            return [Health(*r) for r in await cur.fetchall()]
