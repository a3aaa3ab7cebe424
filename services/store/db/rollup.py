"""The per-minute rollup (migration 0008): incremental refresh from the dirty-range log.

Every ingest and label batch records the time range it touched in ``rollup_dirty`` in its own
transaction. A refresh takes the ranges that end before its new watermark, recomputes exactly
those minutes from raw rows (predictions ⨝ labels), adds the label counts that label batches
left in ``rollup_label_delta`` and moves ``materialized_to`` forward, all in one
transaction: readers see either the old or the new state, never a mix. A batch that commits
after the refresh took the log leaves its range for the next refresh.

Per-model running totals (``prediction_rollup_total``, migration 0013) are what status reads:
every statement that deletes, inserts or relabels rollup rows (here and in retention) adjusts
them in the same statement, so they always equal the sum of the model's rollup rows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import queries
from ._base import Conn, StoreBase
from .types import EPOCH

log = logging.getLogger(__name__)

MINUTE = timedelta(minutes=1)
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
# Serialises refreshes between store replicas ("cyclonf" in ASCII).
_LOCK_KEY = 0x6379636C6F6E67

# Ranges ending after the watermark keep their later part for a later refresh.
TAKE_DIRTY = """
WITH taken AS (DELETE FROM rollup_dirty WHERE lo < %(to)s::timestamptz RETURNING lo, hi),
     kept AS (INSERT INTO rollup_dirty (lo, hi)
              SELECT %(to)s::timestamptz, hi FROM taken WHERE hi > %(to)s::timestamptz)
SELECT lo, least(hi, %(to)s::timestamptz) FROM taken
"""


def clear_rollup(where: str) -> str:
    """Delete the rollup rows matching ``where`` and take them out of the running totals
    (migration 0013) in the same statement, so totals always equal the rows' sum."""
    return f"""
WITH gone AS (
    DELETE FROM prediction_rollup_1m WHERE {where} RETURNING model, predictions, labels
), per_model AS (
    SELECT model, sum(predictions) AS predictions, sum(labels) AS labels FROM gone GROUP BY model
)
UPDATE prediction_rollup_total t
SET predictions = t.predictions - g.predictions, labels = t.labels - g.labels
FROM per_model g
WHERE t.model = g.model
"""


CLEAR = clear_rollup("bucket >= %(lo)s AND bucket < %(hi)s")

# A model none of whose minutes is left (retention) has no total either, as raw counting says.
DROP_EMPTY_TOTALS = "DELETE FROM prediction_rollup_total WHERE predictions = 0"

# Same definitions as prediction_stats_1m_raw (0009), plus labels and the newest row. One
# statement, one snapshot: the label deltas it drops are exactly those its count includes, and
# the running totals gain exactly the rows it inserts.
RECOMPUTE = """
WITH counted AS (
    DELETE FROM rollup_label_delta WHERE bucket >= %(lo)s AND bucket < %(hi)s
), inserted AS (
INSERT INTO prediction_rollup_1m
    (model, version, bucket, predictions, labels, avg_latency_ms, p50_latency_ms,
     max_latency_ms, avg_value, last_at)
SELECT p.model, p.version,
       date_bin(INTERVAL '1 minute', p.created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       count(*), count(*) FILTER (WHERE {has_label}), avg(p.latency_ms),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY p.latency_ms),
       max(p.latency_ms),
       avg(CASE WHEN jsonb_typeof(p.output -> 'value') = 'number'
                THEN (p.output -> 'value')::double precision END),
       max(p.created_at)
FROM predictions p
WHERE p.created_at >= %(lo)s AND p.created_at < %(hi)s
GROUP BY 1, 2, 3
RETURNING model, predictions, labels, last_at
)
INSERT INTO prediction_rollup_total AS t (model, predictions, labels, last_at)
SELECT model, sum(predictions), sum(labels), max(last_at) FROM inserted GROUP BY model
ON CONFLICT (model) DO UPDATE
SET predictions = t.predictions + EXCLUDED.predictions,
    labels = t.labels + EXCLUDED.labels,
    last_at = greatest(t.last_at, EXCLUDED.last_at)
""".replace("{has_label}", queries.HAS_LABEL)

# Label counts added since the last refresh, folded into the rollup and its totals (one
# snapshot for all three); the answer is the rollup rows relabelled.
FOLD_LABELS = """
WITH taken AS (
    DELETE FROM rollup_label_delta WHERE bucket < %(to)s::timestamptz
    RETURNING model, version, bucket, n
), summed AS (
    SELECT model, version, bucket, sum(n) AS n FROM taken GROUP BY 1, 2, 3
), folded AS (
    UPDATE prediction_rollup_1m r SET labels = r.labels + s.n
    FROM summed s
    WHERE r.model = s.model AND r.version = s.version AND r.bucket = s.bucket
    RETURNING r.model, s.n
), per_model AS (
    SELECT model, sum(n) AS n FROM folded GROUP BY model
), totals AS (
    UPDATE prediction_rollup_total t SET labels = t.labels + f.n
    FROM per_model f
    WHERE t.model = f.model
)
SELECT count(*) FROM folded
"""

MARK_DIRTY = "INSERT INTO rollup_dirty (lo, hi) VALUES (%s, %s)"


def first_uuid7(at: datetime) -> uuid.UUID:
    """The smallest UUIDv7 of millisecond ``at``: ids below it are from earlier."""
    return uuid.UUID(int=int((at - EPOCH) // timedelta(milliseconds=1)) << 80)


def floor_minute(t: datetime) -> datetime:
    return ORIGIN + (t - ORIGIN) // MINUTE * MINUTE


def dirty_span(first: datetime, last: datetime) -> tuple[datetime, datetime]:
    """The whole minutes covering rows from ``first`` to ``last`` (inclusive)."""
    return floor_minute(first), floor_minute(last) + MINUTE


def merge_ranges(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Minute-aligned, sorted, non-overlapping ranges covering ``ranges``."""
    aligned = sorted(
        (floor_minute(lo), floor_minute(hi - timedelta(microseconds=1)) + MINUTE)
        for lo, hi in ranges
        if hi > lo
    )
    merged: list[tuple[datetime, datetime]] = []
    for lo, hi in aligned:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


@dataclass(frozen=True, slots=True)
class RefreshResult:
    materialized_to: datetime | None
    minutes: int
    relabelled: int = 0
    skipped: bool = False


async def mark_dirty(conn: Conn, first: datetime, last: datetime) -> None:
    """Record, in the caller's transaction, that rows from ``first`` to ``last`` changed."""
    await conn.execute(MARK_DIRTY, dirty_span(first, last))


class RollupMixin(StoreBase):
    # Minutes newer than this are read from raw rows: still filling, not worth materializing.
    rollup_lag = timedelta(seconds=10)

    async def refresh_rollup(self, now: datetime | None = None) -> RefreshResult:
        """Materialize the changed minutes up to the last whole minute before ``now - lag``."""
        async with self.transaction() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s), now()", (_LOCK_KEY,))
            row = await cur.fetchone()
            assert row is not None
            if not row[0]:
                return RefreshResult(None, 0, 0, skipped=True)
            to = floor_minute((now or row[1]) - self.rollup_lag)
            cur = await conn.execute(TAKE_DIRTY, {"to": to})
            ranges = merge_ranges(await cur.fetchall())
            for lo, hi in ranges:
                await conn.execute(CLEAR, {"lo": lo, "hi": hi})
                await conn.execute(RECOMPUTE, {"lo": lo, "hi": hi})
            if ranges:
                await conn.execute(DROP_EMPTY_TOTALS)
            cur = await conn.execute(FOLD_LABELS, {"to": to})
            folded = await cur.fetchone()
            relabelled = int(folded[0]) if folded is not None else 0
            await conn.execute(
                "UPDATE rollup_state SET materialized_to = greatest(materialized_to, %s)", (to,)
            )
        minutes = sum((hi - lo) // MINUTE for lo, hi in ranges)
        if minutes or relabelled:
            log.debug(
                "rollup: %d minute(s) recomputed, %d relabelled, materialized to %s",
                minutes,
                relabelled,
                to,
            )
        return RefreshResult(to, minutes, relabelled)


__all__ = [
    "DROP_EMPTY_TOTALS",
    "RefreshResult",
    "RollupMixin",
    "clear_rollup",
    "dirty_span",
    "first_uuid7",
    "mark_dirty",
    "merge_ranges",
]
