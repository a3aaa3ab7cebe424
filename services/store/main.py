"""Builds and runs the store server from `StoreSettings`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from datetime import timedelta

from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.store.db import StoreDB
from services.store.embedded import EmbeddedPostgres, resolve_database_url
from services.store.servicer import StoreServicer

log = logging.getLogger(__name__)

STORE_SERVICE = "cyclone.store.v1.StoreService"


@dataclasses.dataclass(frozen=True)
class StoreSettings(ServerSettings):
    port: int = 8002
    # A real server (postgresql://...); without it Cyclone starts its own PostgreSQL.
    database_url: str | None = None
    pool_min_size: int = 2
    pool_max_size: int = 10
    partitions_ahead_days: int = 7
    compress_after_days: int = 7
    retention_days: int = 365
    # Embedded server only: fsync off. For tests and benchmarks, never for real data.
    embedded_fast_unsafe: bool = False


async def _maintain_partitions(db: StoreDB, every: float = 3600.0) -> None:
    """Keep daily partitions created ahead (plain PostgreSQL mode)."""
    while True:
        await asyncio.sleep(every)
        try:
            await db.ensure_partitions()
        except Exception:
            log.exception("creating partitions ahead failed; retrying in %.0fs", every)


async def open_store(settings: StoreSettings) -> tuple[StoreDB, EmbeddedPostgres | None]:
    if settings.database_url:
        url, embedded = settings.database_url, None
    else:
        url, embedded = await asyncio.to_thread(
            resolve_database_url, settings.data_dir, fast_unsafe=settings.embedded_fast_unsafe
        )
    db = StoreDB(
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        partitions_ahead_days=settings.partitions_ahead_days,
        compress_after=timedelta(days=settings.compress_after_days),
        retain_for=timedelta(days=settings.retention_days),
    )
    try:
        await db.open(url)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    where = "embedded PostgreSQL" if embedded is not None else "PostgreSQL"
    log.info("store on %s, storage mode %s", where, db.mode)
    return db, embedded


async def build_store_server(settings: StoreSettings) -> CycloneServer:
    db, embedded = await open_store(settings)
    server = CycloneServer("store", settings)
    server.add_service(
        STORE_SERVICE, lambda s: pb_grpc.add_StoreServiceServicer_to_server(StoreServicer(db), s)
    )
    maintenance = asyncio.create_task(_maintain_partitions(db))

    async def shutdown() -> None:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await db.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    server.on_shutdown(shutdown)
    return server
