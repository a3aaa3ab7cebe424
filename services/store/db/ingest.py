"""Prediction ingest (binary COPY) and labels."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime

import psycopg
from psycopg import AsyncCursor
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import TupleRow

from cyclone.errors import InvalidArgument

from . import queries
from ._base import Conn, StoreBase
from .rollup import mark_dirty
from .types import LabelResult, PredictionRecord, uuid7_time

log = logging.getLogger(__name__)


class ForeignLabels(InvalidArgument):
    """Labels sent for `model` whose predictions belong to other models (id -> its model)."""

    def __init__(self, model: str, owners: dict[uuid.UUID, str]) -> None:
        pid, owner = next(iter(owners.items()))
        super().__init__(
            f"labels: prediction {pid} is a prediction of model {owner!r}, not {model!r}"
        )
        self.model = model
        self.owners = owners


_JSONB_OID = 3802


class _RawJsonbBinaryDumper(Dumper):
    """Sends already-serialised JSON as binary jsonb (version byte 1 + UTF-8 text).

    The stock jsonb dumper would json.dumps() a str again; ingest must not re-serialise.
    """

    format = Format.BINARY
    oid = _JSONB_OID

    def dump(self, obj: str | bytes) -> Buffer:
        return b"\x01" + (obj.encode() if isinstance(obj, str) else obj)


def prepare_copy_cursor(cur: AsyncCursor[TupleRow]) -> None:
    """Register the raw jsonb dumper on one cursor only (not the pool's connections)."""
    cur.adapters.register_dumper(str, _RawJsonbBinaryDumper)
    cur.adapters.register_dumper(bytes, _RawJsonbBinaryDumper)


def _normalise(r: PredictionRecord) -> PredictionRecord:
    pid = r.prediction_id if isinstance(r.prediction_id, uuid.UUID) else uuid.UUID(r.prediction_id)
    created = r.created_at if r.created_at is not None else uuid7_time(pid)
    return r._replace(prediction_id=pid, created_at=created)


_COPY_SQL = f"COPY {{table}} ({queries.COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)"


async def _copy_rows(conn: Conn, table: str, rows: Sequence[PredictionRecord]) -> None:
    async with conn.cursor() as cur:
        prepare_copy_cursor(cur)
        async with cur.copy(_COPY_SQL.format(table=table).encode()) as copy:
            copy.set_types(queries.COPY_TYPES)
            write = copy.write_row
            for r in rows:
                # Records from the edge are usually ready; only fix up the odd one.
                if r.created_at is None or type(r.prediction_id) is not uuid.UUID:
                    r = _normalise(r)
                await write(r)


CopyBody = Callable[[Conn, str], Awaitable[None]]


async def _copy_payload(conn: Conn, table: str, payload: bytes) -> None:
    async with conn.cursor() as cur, cur.copy(_COPY_SQL.format(table=table).encode()) as copy:
        await copy.write(payload)


class IngestMixin(StoreBase):
    async def copy_predictions(self, rows: Sequence[PredictionRecord]) -> int:
        """Ingest one batch; idempotent on prediction id. Returns the number of new rows."""
        if not rows:
            return 0
        rows = [_normalise(r) for r in rows]
        times = [r.created_at for r in rows if r.created_at is not None]
        return await self._copy_idempotent(
            lambda conn, table: _copy_rows(conn, table, rows), len(rows), (min(times), max(times))
        )

    async def copy_prediction_payload(
        self, payload: bytes, rows: int, span: tuple[datetime, datetime]
    ) -> int:
        """Ingest a binary COPY payload (see copy_binary); idempotent like copy_predictions.

        ``span``: the oldest and newest created_at in the payload (for the rollup).
        """
        if not rows:
            return 0
        return await self._copy_idempotent(
            lambda conn, table: _copy_payload(conn, table, payload), rows, span
        )

    async def _copy_idempotent(
        self, body: CopyBody, rows: int, span: tuple[datetime, datetime]
    ) -> int:
        """Fast path: COPY straight into ``predictions``. A replayed batch (lost ack) hits
        the unique index; the batch is then re-sent through a temp table with
        ``ON CONFLICT DO NOTHING`` so only the missing rows are added. Either way the batch's
        time span is marked for the rollup in the same transaction.
        """
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    await body(conn, "predictions")
                    await mark_dirty(conn, *span)
                return rows
            except psycopg.errors.UniqueViolation:
                log.info("batch of %d overlaps stored predictions; de-duplicating", rows)
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS predictions_stage"
                    " (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await body(conn, "predictions_stage")
                cur = await conn.execute(
                    "INSERT INTO predictions SELECT * FROM predictions_stage"
                    " ON CONFLICT (prediction_id, created_at) DO NOTHING"
                )
                await mark_dirty(conn, *span)
                return cur.rowcount

    async def add_labels(
        self,
        items: Iterable[tuple[uuid.UUID | str, str | bytes]],
        *,
        model: str | None = None,
        not_before: datetime | None = None,
    ) -> LabelResult:
        """Store labels (JSON text); a repeated id replaces the earlier label.

        Labels whose prediction is not stored (yet) are kept and returned as ``unmatched``.
        Labels of predictions made before ``not_before`` (past retention: dropped, or about
        to be) are not stored and are returned as ``expired``.
        Within one call the last label for an id wins.
        """
        latest: dict[uuid.UUID, str] = {}
        expired: list[uuid.UUID] = []
        for pid, label in items:
            key = pid if isinstance(pid, uuid.UUID) else uuid.UUID(pid)
            if not_before is not None and uuid7_time(key) < not_before:
                expired.append(key)
                continue
            latest[key] = label.decode() if isinstance(label, bytes) else label
        if not latest:
            return LabelResult(0, [], expired)
        async with self.pool.connection() as conn, conn.transaction():
            # Each id is looked up in one partition by its index. A partition filled since its
            # last ANALYZE looks empty to the planner, which then prefers a sequential scan per
            # id: seconds per batch until autovacuum catches up (seen at midnight rollover and
            # in bench/store_scale.py). Never worth it for point lookups.
            await conn.execute("SET LOCAL enable_seqscan = off")
            cur = await conn.execute(
                queries.UPSERT_LABELS,
                {"ids": list(latest), "labels": list(latest.values()), "model": model},
            )
            row = await cur.fetchone()
            assert row is not None
            if row[2]:  # nothing was stored; raising here rolls back the rollup's delta too
                raise ForeignLabels(model or "", dict(zip(row[2], row[3], strict=True)))
        return LabelResult(int(row[0]), list(row[1]), expired)


__all__ = ["IngestMixin", "prepare_copy_cursor"]
