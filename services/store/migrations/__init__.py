"""Versioned SQL migrations.

Files are ``NNNN_name.sql`` (both modes) or ``NNNN_name.<mode>.sql`` where mode is
``timescale`` or ``partitioned``; each version must exist either once for both modes or once per
mode. ``run_migrations`` applies the pending ones in order, each in its own transaction, under a
session advisory lock so concurrent store start-ups apply them exactly once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

log = logging.getLogger(__name__)

Mode = Literal["timescaledb", "postgres-partitioned"]
_FILE_MODE = {"timescaledb": "timescale", "postgres-partitioned": "partitioned"}
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(timescale|partitioned))?\.sql$")
# Arbitrary constant shared by every Cyclone store: "cyclone" in ASCII.
MIGRATION_LOCK_KEY = 0x6379636C6F6E65


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_for(mode: Mode) -> list[Migration]:
    """The ordered migrations the store runs in ``mode`` (the test feeds these to PGlite)."""
    wanted = _FILE_MODE[mode]
    found: dict[int, Migration] = {}
    for entry in resources.files(__name__).iterdir():
        m = _NAME.match(entry.name)
        if m is None or (m.group(3) is not None and m.group(3) != wanted):
            continue
        version = int(m.group(1))
        if version in found:
            raise RuntimeError(f"duplicate migration version {version}: {entry.name}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def detect_mode(conn: AsyncConnection[TupleRow]) -> Mode:
    """The recorded mode if the schema exists, else TimescaleDB when the server offers it."""
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is not None and row[0]:
        cur = await conn.execute("SELECT mode FROM schema_migrations ORDER BY version LIMIT 1")
        rec = await cur.fetchone()
        if rec is not None:
            return _as_mode(str(rec[0]))
    cur = await conn.execute(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        return "postgres-partitioned"
    # Available is not loadable: TimescaleDB also needs shared_preload_libraries.
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        log.warning("timescaledb is available but cannot be created (%s); using partitioning", exc)
        return "postgres-partitioned"
    return "timescaledb"


def _as_mode(value: str) -> Mode:
    if value == "timescaledb":
        return "timescaledb"
    if value == "postgres-partitioned":
        return "postgres-partitioned"
    raise RuntimeError(f"unknown storage mode recorded in schema_migrations: {value!r}")


async def run_migrations(conn: AsyncConnection[TupleRow], mode: Mode | None = None) -> Mode:
    """Apply pending migrations; returns the storage mode. ``conn`` must be in autocommit."""
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, mode text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        detected = await detect_mode(conn)
        if mode is not None and mode != detected:
            cur = await conn.execute("SELECT count(*) FROM schema_migrations")
            row = await cur.fetchone()
            if row is not None and row[0]:
                raise RuntimeError(f"database was created in mode {detected}, not {mode}")
        mode = mode or detected
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {int(r[0]) for r in await cur.fetchall()}
        for mig in migrations_for(mode):
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, mode) VALUES (%s, %s, %s)",
                    (mig.version, mig.name, mode),
                )
            log.info("applied migration %04d_%s (%s)", mig.version, mig.name, mode)
        return mode
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
