"""Daily range partitions for plain PostgreSQL mode."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

log = logging.getLogger(__name__)

PARTITIONED_TABLES = ("predictions", "metric_points")
# Serialises partition maintenance between store replicas (distinct from the migration lock).
_LOCK_KEY = 0x6379636C6F6E66


def _day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


async def ensure_partitions(
    conn: AsyncConnection[TupleRow], ahead_days: int, today: date | None = None
) -> list[str]:
    """Create missing daily partitions for [today - 1, today + ahead_days].

    Rows for a new day that already landed in the DEFAULT partition are moved into the new
    partition in the same transaction (ATTACH would otherwise fail on them).
    """
    today = today or datetime.now(UTC).date()
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        for offset in range(-1, ahead_days + 1):
            day = today + timedelta(days=offset)
            name = f"{table}_p{day:%Y%m%d}"
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    continue
                lo, hi = _day_start(day), _day_start(day + timedelta(days=1))
                ident, parent = sql.Identifier(name), sql.Identifier(table)
                default = sql.Identifier(f"{table}_default")
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    ).format(ident, parent)
                )
                await conn.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM {} WHERE created_at >= %s AND created_at < %s"
                        " RETURNING *) INSERT INTO {} SELECT * FROM moved"
                    ).format(default, ident),
                    (lo, hi),
                )
                # DDL takes no bind parameters: bounds are client-side literals of our datetimes.
                await conn.execute(
                    sql.SQL(
                        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
                    ).format(parent, ident, sql.Literal(lo), sql.Literal(hi))
                )
                created.append(name)
    if created:
        log.info("created partitions: %s", ", ".join(created))
    return created


async def drop_partitions_before(conn: AsyncConnection[TupleRow], before: datetime) -> list[str]:
    """Drop the daily partitions whose rows all precede ``before`` (a UTC midnight)."""
    cutoff = before.date()
    dropped: list[str] = []
    for table in PARTITIONED_TABLES:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass AND c.relname LIKE %s",
            (table, f"{table}_p%"),
        )
        for (name,) in await cur.fetchall():
            day = datetime.strptime(str(name).rsplit("_p", 1)[1], "%Y%m%d").date()
            if day + timedelta(days=1) <= cutoff:
                await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(str(name))))
                dropped.append(str(name))
    return dropped
