"""Metric points and the alerts outbox."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ._base import Conn, StoreBase
from .types import Alert, AlertTarget, MetricPoint, NotFoundError

_ALERT_COLS = (
    "model, level, version, previous_level, reasons, actions, id, created_at, status, attempts,"
    " next_attempt_at, delivered_at, acknowledged_at, last_error, traceparent"
)


def _alert(row: TupleRow) -> Alert:
    model, level, version, previous, reasons, actions, *rest = row
    # `actions` is the JSON list of targets: [{"action", "sink", "config"}].
    targets = [AlertTarget.from_json(t) for t in actions or ()]
    return Alert(model, level, version, previous, reasons, targets, *rest)


class OutboxMixin(StoreBase):
    async def insert_metric_points(
        self, points: Sequence[MetricPoint], *, conn: Conn | None = None
    ) -> int:
        if not points:
            return 0
        async with self._conn(conn) as c, c.cursor() as cur:
            await cur.executemany(
                "INSERT INTO metric_points (created_at, model, version, metric, value, level,"
                " details) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        p.created_at,
                        p.model,
                        p.version,
                        p.metric,
                        p.value,
                        p.level,
                        Jsonb(p.details) if p.details is not None else None,
                    )
                    for p in points
                ],
            )
        return len(points)

    async def metric_points(
        self,
        model: str,
        start: datetime,
        end: datetime,
        metric: str | None = None,
    ) -> list[MetricPoint]:
        async with self.pool.connection() as c:
            cur = await c.execute(
                "SELECT created_at, model, version, metric, value, level, details"
                " FROM metric_points WHERE model = %(m)s AND created_at >= %(s)s"
                " AND created_at < %(e)s AND (%(x)s::text IS NULL OR metric = %(x)s::text)"
                " ORDER BY created_at, metric",
                {"m": model, "s": start, "e": end, "x": metric},
            )
            return [MetricPoint(*r) for r in await cur.fetchall()]

    async def insert_alert(self, alert: Alert, *, conn: Conn | None = None) -> int:
        """Queue an alert. Pass ``conn`` from ``transaction()`` to commit it atomically with the
        monitor's state change."""
        async with self._conn(conn) as c:
            cur = await c.execute(
                "INSERT INTO alerts (model, version, level, previous_level, reasons, actions,"
                " next_attempt_at, traceparent)"
                " VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s, now()), %s) RETURNING id",
                (
                    alert.model,
                    alert.version,
                    alert.level,
                    alert.previous_level,
                    Jsonb(alert.reasons),
                    Jsonb([t.to_json() for t in alert.targets]),
                    alert.next_attempt_at,
                    alert.traceparent,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def insert_alert_in_tx(self, conn: Conn, alert: Alert) -> int:
        return await self.insert_alert(alert, conn=conn)

    async def due_alerts(
        self, now: datetime, limit: int = 100, lease: timedelta = timedelta(seconds=60)
    ) -> list[Alert]:
        """Claim alerts due for (re)delivery.

        Claimed alerts are pushed ``lease`` into the future, so concurrent dispatchers never get
        the same alert and one that crashed mid-delivery is retried after the lease.
        """
        async with self.pool.connection() as c:
            cur = await c.execute(
                "UPDATE alerts SET next_attempt_at = %(now)s::timestamptz + %(lease)s"
                " WHERE id IN (SELECT id FROM alerts WHERE status IN ('pending', 'failed')"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s)"
                " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " RETURNING " + _ALERT_COLS,
                {"now": now, "lease": lease, "limit": limit},
            )
            return sorted((_alert(r) for r in await cur.fetchall()), key=lambda a: a.id or 0)

    async def mark_alert_delivered(self, alert_id: int) -> None:
        await self._update_alert(
            # An alert a person acknowledged while it was in flight stays acknowledged.
            "UPDATE alerts SET status = CASE WHEN status = 'acknowledged' THEN status"
            " ELSE 'delivered' END, delivered_at = now(),"
            " attempts = attempts + 1, next_attempt_at = NULL, last_error = NULL WHERE id = %s",
            (alert_id,),
        )

    async def mark_alert_failed(
        self, alert_id: int, error: str, next_attempt_at: datetime | None
    ) -> None:
        """Record a failed attempt; ``next_attempt_at=None`` gives up (status 'dead')."""
        await self._update_alert(
            "UPDATE alerts SET status = CASE WHEN status = 'acknowledged' THEN status"
            " WHEN %s::timestamptz IS NULL THEN 'dead' ELSE 'failed' END,"
            " attempts = attempts + 1, last_error = %s,"
            " next_attempt_at = CASE WHEN status = 'acknowledged' THEN NULL ELSE %s::timestamptz END"
            " WHERE id = %s",
            (next_attempt_at, error, next_attempt_at, alert_id),
        )

    async def acknowledge_alert(self, alert_id: int) -> None:
        await self._update_alert(
            "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(),"
            " next_attempt_at = NULL WHERE id = %s",
            (alert_id,),
        )

    async def _update_alert(self, q: str, params: tuple[object, ...]) -> None:
        async with self.pool.connection() as c:
            cur = await c.execute(q.encode(), params)
            if cur.rowcount == 0:
                raise NotFoundError(f"alert {params[-1]} not found")

    async def get_alert(self, alert_id: int) -> Alert | None:
        async with self.pool.connection() as c:
            cur = await c.execute(
                "SELECT " + _ALERT_COLS + " FROM alerts WHERE id = %s", (alert_id,)
            )
            row = await cur.fetchone()
        return _alert(row) if row else None

    async def list_alerts(
        self, model: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Alert]:
        """Newest first."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                "SELECT " + _ALERT_COLS + " FROM alerts"
                " WHERE (%(m)s::text IS NULL OR model = %(m)s::text)"
                " AND (%(s)s::text IS NULL OR status = %(s)s::text) ORDER BY id DESC LIMIT %(l)s",
                {"m": model, "s": status, "l": limit},
            )
            return [_alert(r) for r in await cur.fetchall()]
