"""Retention: rows older than the store's retention go, in both storage modes.

Plain PostgreSQL drops whole daily partitions (no DELETE, no bloat); TimescaleDB drops chunks
through its retention policy (timescale.py). Either way the store then deletes what belongs to
the dropped days in its own tables: labels (by id: a UUIDv7 orders by its millisecond, so the
primary key is a time index), rollup minutes (and their share of the running totals) and
their pending ranges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from psycopg import sql

from ._base import StoreBase
from .partitions import PARTITIONED_TABLES, drop_partitions_before
from .rollup import DROP_EMPTY_TOTALS, clear_rollup, first_uuid7

# The dropped days' rollup minutes leave the running totals in the same statement.
_CLEAR_PAST = clear_rollup("bucket < %(cutoff)s")

log = logging.getLogger(__name__)


def retention_cutoff(retain_for: timedelta | None, now: datetime | None = None) -> datetime | None:
    """Start of the oldest day kept: rows before it are dropped (None: keep forever)."""
    if retain_for is None:
        return None
    day = ((now or datetime.now(UTC)) - retain_for).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass(frozen=True)
class RetentionResult:
    cutoff: datetime | None
    dropped_partitions: list[str] = field(default_factory=list)
    deleted_labels: int = 0


class RetentionMixin(StoreBase):
    def retention_cutoff(self, now: datetime | None = None) -> datetime | None:
        return retention_cutoff(self.retain_for, now)

    async def apply_retention(self, now: datetime | None = None) -> RetentionResult:
        """Drop what is past retention; a no-op when the store keeps everything."""
        cutoff = self.retention_cutoff(now)
        if cutoff is None:
            return RetentionResult(None)
        dropped: list[str] = []
        async with self.pool.connection() as conn:
            if self.mode == "postgres-partitioned":
                dropped = await drop_partitions_before(conn, cutoff)
                for table in PARTITIONED_TABLES:
                    # Rows that landed in DEFAULT (days without a partition) go row by row.
                    await conn.execute(
                        sql.SQL("DELETE FROM {} WHERE created_at < %s").format(
                            sql.Identifier(f"{table}_default")
                        ),
                        (cutoff,),
                    )
            cur = await conn.execute(
                "DELETE FROM labels WHERE prediction_id < %s", (first_uuid7(cutoff),)
            )
            deleted = cur.rowcount
            await conn.execute(_CLEAR_PAST, {"cutoff": cutoff})
            await conn.execute(DROP_EMPTY_TOTALS)
            await conn.execute("DELETE FROM rollup_dirty WHERE hi <= %s", (cutoff,))
            await conn.execute("DELETE FROM rollup_label_delta WHERE bucket < %s", (cutoff,))
        if dropped or deleted:
            log.info(
                "retention (before %s): dropped %s, %d label(s)",
                cutoff.isoformat(),
                ", ".join(dropped) or "no partition",
                deleted,
            )
        return RetentionResult(cutoff, dropped, deleted)


__all__ = ["RetentionMixin", "RetentionResult", "retention_cutoff"]
