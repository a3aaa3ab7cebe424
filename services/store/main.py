"""Builds and runs the store server from `StoreSettings`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from datetime import timedelta

from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings, SettingsError
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.store.db import StoreDB
from services.store.embedded import EmbeddedPostgres, resolve_database_url, start_embedded
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
    # TimescaleDB: compress chunks older than this.
    compress_after_days: int = 7
    # Predictions, labels, metric points and rollup minutes older than this many days are
    # dropped (whole days); 0 keeps everything forever.
    retention_days: int = 30
    # How often the store refreshes its per-minute rollup (seconds); retention and partitions
    # ahead are kept hourly.
    rollup_refresh_seconds: float = 20.0
    # Embedded server only: fsync off. For tests and benchmarks, never for real data.
    embedded_fast_unsafe: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retention_days < 0:
            raise SettingsError(
                f"retention_days: must be a number of days, or 0 to keep everything;"
                f" got {self.retention_days}"
            )
        if self.compress_after_days < 1:
            raise SettingsError(
                f"compress_after_days: must be at least 1, got {self.compress_after_days}"
            )
        if self.partitions_ahead_days < 1:
            raise SettingsError(
                f"partitions_ahead_days: must be at least 1, got {self.partitions_ahead_days}"
            )
        if not self.rollup_refresh_seconds > 0:
            raise SettingsError(
                f"rollup_refresh_seconds: must be positive, got {self.rollup_refresh_seconds}"
            )

    @property
    def retain_for(self) -> timedelta | None:
        return timedelta(days=self.retention_days) if self.retention_days else None


async def _maintain(db: StoreDB, every: float, housekeeping_every: float = 3600.0) -> None:
    """Refresh the rollup every ``every`` seconds; hourly, partitions ahead and retention."""
    loop = asyncio.get_running_loop()
    housekeeping_at = loop.time()
    while True:
        try:
            if loop.time() >= housekeeping_at:
                housekeeping_at = loop.time() + housekeeping_every
                await db.ensure_partitions()
                await db.apply_retention()
            await db.refresh_rollup()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store maintenance failed; retrying in %.0fs", every)
        await asyncio.sleep(every)


async def _keep_embedded(
    embedded: EmbeddedPostgres, settings: StoreSettings, every: float = 1.0
) -> None:
    """The embedded PostgreSQL is this store's: killed (OOM killer, kill -9) it is started
    again on the same data and socket, and the pools' connections come back by themselves
    (this store's and a second store's over it). Nothing else would restart it: the store
    process lives on, so its supervisor sees nothing wrong."""
    while True:
        await asyncio.sleep(every)
        if embedded.running():
            continue
        log.error("embedded PostgreSQL (%s) is gone; starting it again", embedded.pgdata)
        try:
            await asyncio.to_thread(
                start_embedded, settings.data_dir, fast_unsafe=settings.embedded_fast_unsafe
            )
        except Exception:
            log.exception("embedded PostgreSQL did not start again; next try in %.0fs", every)


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
        retain_for=settings.retain_for,
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
    maintenance = asyncio.create_task(_maintain(db, settings.rollup_refresh_seconds))
    tasks = [maintenance]
    if embedded is not None:
        tasks.append(asyncio.create_task(_keep_embedded(embedded, settings)))

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await db.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    server.on_shutdown(shutdown)
    return server
