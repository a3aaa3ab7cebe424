"""Pool, start-up (migrations, partitions, policies) and transactions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from .. import migrations, timescale
from .partitions import ensure_partitions
from .types import Mode

log = logging.getLogger("services.store.db")

Conn = AsyncConnection[TupleRow]


# The store's reads are short index scans, but the planner costs the raw-row branches of
# prediction_stats_1m_range and the status query by whole partitions, so their estimates pass
# jit_above_cost once the table holds a few days: compiling (~50-700 ms) then dwarfed the
# ~2 ms of execution, and grew with the partitions in the plan (docs/performance.md).
async def _configure(conn: Conn) -> None:
    await conn.execute("SET jit = off")


class StoreBase:
    """Owns the connection pool. Every write method takes an optional ``conn`` so callers can
    group writes in one transaction via ``async with db.transaction() as conn``."""

    def __init__(
        self,
        *,
        min_size: int = 2,
        max_size: int = 10,
        partitions_ahead_days: int = 7,
        compress_after: timedelta = timedelta(days=7),
        retain_for: timedelta | None = timedelta(days=30),
    ) -> None:
        self._min_size = min_size
        self._max_size = max_size
        self.partitions_ahead_days = partitions_ahead_days
        self.compress_after = compress_after
        # None: keep forever.
        self.retain_for = retain_for
        self._pool: AsyncConnectionPool[Conn] | None = None
        self.mode: Mode = "postgres-partitioned"

    @property
    def pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise RuntimeError("StoreDB is not open")
        return self._pool

    async def open(self, url: str, *, migrate: bool = True, mode: Mode | None = None) -> None:
        """Connect, run pending migrations and prepare partitions (plain mode) or policies."""
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            if migrate:
                self.mode = await migrations.run_migrations(conn, mode)
            else:
                self.mode = await migrations.detect_mode(conn)
            if self.mode == "timescaledb":
                for stmt in timescale.policy_statements(self.compress_after, self.retain_for):
                    await conn.execute(stmt.encode())
        log.info("store database ready (mode=%s)", self.mode)
        self._pool = AsyncConnectionPool(
            url,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs={"autocommit": True},
            configure=_configure,
            open=False,
            name="cyclone-store",
            # Fail a request after 5 s without a connection (database down) rather than
            # hold it for the default 30 s: callers such as the inference sink retry anyway.
            timeout=5.0,
            # Hand out only live connections, so a restarted database costs one reconnect
            # instead of one failed request per pooled connection.
            check=AsyncConnectionPool.check_connection,
        )
        await self._pool.open(wait=True, timeout=30)
        if self.mode == "postgres-partitioned":
            await self.ensure_partitions()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> StoreBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside a transaction; commit on exit, roll back on error."""
        async with self.pool.connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def _conn(self, conn: Conn | None) -> AsyncIterator[Conn]:
        if conn is not None:
            yield conn
            return
        async with self.pool.connection() as c:
            yield c

    async def ensure_partitions(self, ahead_days: int | None = None) -> list[str]:
        """Plain mode: create daily partitions from yesterday to ``ahead_days`` ahead.

        Returns the partitions created; a no-op in TimescaleDB mode (chunks are automatic).
        """
        if self.mode != "postgres-partitioned":
            return []
        days = self.partitions_ahead_days if ahead_days is None else ahead_days
        async with self.pool.connection() as conn:
            return await ensure_partitions(conn, days)
