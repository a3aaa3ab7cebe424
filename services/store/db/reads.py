"""Training windows, prediction browsing, stats."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from . import queries
from ._base import StoreBase
from .rollup import MINUTE
from .types import (
    ColumnChunk,
    FeatureFilter,
    MinuteStats,
    ModelStats,
    PredictionRow,
    TrainingChunk,
)

_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}

# Wrong = labelled and (classification) the predicted label differs from the true one both as
# JSON (1 == 1.0) and as text (1 == "1"), or (regression) |value - label| > tolerance.
_WRONG = """
 AND l.label IS NOT NULL AND (CASE
   WHEN p.output ? 'label' THEN
     (p.output -> 'label') <> l.label AND (p.output ->> 'label') <> (l.label #>> '{}')
   WHEN jsonb_typeof(p.output -> 'value') = 'number' AND jsonb_typeof(l.label) = 'number' THEN
     abs((p.output -> 'value')::double precision - l.label::double precision) > %(tolerance)s
   ELSE false END)"""


def encode_page_token(created_at: datetime, prediction_id: uuid.UUID) -> str:
    raw = f"{created_at.astimezone(UTC).isoformat()}|{prediction_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        ts, pid = raw.split("|", 1)
        return datetime.fromisoformat(ts), uuid.UUID(pid)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid page token") from exc


# REPEATABLE READ takes the snapshot at the transaction's first query and keeps it.
STATS_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def stats_params(
    model: str | None, materialized_to: datetime, pending: list[datetime]
) -> dict[str, object]:
    """queries.STATS' parameters: the rollup's watermark and the minutes read raw below it."""
    return {
        "model": model,
        "since": materialized_to,
        "pending": pending,
        # Bounds the planner can prune by; an empty range when nothing is pending.
        "pending_lo": min(pending, default=materialized_to),
        "pending_hi": max(pending) + MINUTE if pending else materialized_to,
    }


class ReadsMixin(StoreBase):
    async def training_data(
        self,
        model: str,
        start: datetime | None = None,
        end: datetime | None = None,
        last_n: int | None = None,
        version: str | None = None,
        chunk_rows: int = 10_000,
        include_unlabelled: bool = False,
    ) -> AsyncIterator[TrainingChunk]:
        """Labelled rows (predictions ⨝ labels), time ordered, in columnar chunks.

        Give a window (start, end), or last_n, or both (the last N of the window). Streams via a
        server-side cursor; JSON columns arrive as text and are decoded only on demand. Close the
        iterator (``contextlib.aclosing``) if you stop early, to return the connection.
        """
        if (start is None) != (end is None):
            raise ValueError("give both start and end, or neither")
        if start is None and last_n is None:
            raise ValueError("give a time window, last_n, or both")
        q = queries.training_query(
            window=start is not None,
            last_n=last_n is not None,
            version=version is not None,
            include_unlabelled=include_unlabelled,
        )
        params = {"model": model, "start": start, "end": end, "last_n": last_n, "version": version}
        async with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="cyclone_training", binary=True) as cur,
        ):
            cur.itersize = chunk_rows
            await cur.execute(q, params)
            while rows := await cur.fetchmany(chunk_rows):
                ids, ts, inp, out, lab = zip(*rows, strict=True)
                yield TrainingChunk(ids, ts, inp, out, lab)

    async def training_columns(
        self,
        model: str,
        features: Sequence[tuple[str, str]],
        task: str,
        class_labels: Sequence[str] = (),
        start: datetime | None = None,
        end: datetime | None = None,
        last_n: int | None = None,
        version: str | None = None,
        chunk_rows: int = 10_000,
        include_unlabelled: bool = False,
    ) -> AsyncIterator[ColumnChunk]:
        """`training_data` for a known schema: typed columns, no JSON parsing in Python.

        :param features: (name, "numeric" | "categorical") in the order wanted.
        """
        if (start is None) != (end is None):
            raise ValueError("give both start and end, or neither")
        if start is None and last_n is None:
            raise ValueError("give a time window, last_n, or both")
        q, names = queries.training_columns_query(
            features,
            task,
            class_labels,
            window=start is not None,
            last_n=last_n is not None,
            version=version is not None,
            include_unlabelled=include_unlabelled,
        )
        params: dict[str, object] = {
            "model": model,
            "start": start,
            "end": end,
            "last_n": last_n,
            "version": version,
            **names,
        }
        n_features, n_classes = len(features), len(class_labels) if task == "classification" else 0
        async with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="cyclone_training_columns", binary=True) as cur,
        ):
            cur.itersize = chunk_rows
            await cur.execute(q.encode(), params)
            while rows := await cur.fetchmany(chunk_rows):
                cols = list(zip(*rows, strict=True))  # transpose in C
                feature_cols = cols[4 : 4 + n_features]
                yield ColumnChunk(
                    prediction_ids=cols[0],
                    created_at_micros=cols[1],
                    labelled=cols[2],
                    features={name: feature_cols[i] for i, (name, _) in enumerate(features)},
                    predictions=cols[4 + n_features],
                    probabilities=cols[5 + n_features : 5 + n_features + n_classes],
                    labels=cols[-1],
                    latency_ms=cols[3],
                )

    async def query_predictions(
        self,
        model: str,
        version: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        labelled: bool | None = None,
        wrong_only: bool = False,
        feature_filter: FeatureFilter | None = None,
        page_size: int = 100,
        page_token: str | None = None,
        tolerance: float = 0.0,
    ) -> tuple[list[PredictionRow], str | None]:
        """One page, oldest first, keyset-paginated on (created_at, prediction_id).

        ``wrong_only`` implies labelled. Returns the rows and the next page token (None at end).
        """
        params: dict[str, Any] = {"model": model, "limit": max(1, min(page_size, 10_000))}
        q = (
            "SELECT p.prediction_id, p.created_at, p.model, p.version, p.input, p.output,"
            " p.latency_ms, p.trace_id, l.label, l.labelled_at"
            " FROM predictions p LEFT JOIN labels l ON l.prediction_id = p.prediction_id"
            " WHERE p.model = %(model)s"
        )
        if version is not None:
            q += " AND p.version = %(version)s"
            params["version"] = version
        if start is not None:
            q += " AND p.created_at >= %(start)s"
            params["start"] = start
        if end is not None:
            q += " AND p.created_at < %(end)s"
            params["end"] = end
        if labelled is True:
            q += " AND l.prediction_id IS NOT NULL"
        elif labelled is False:
            q += " AND l.prediction_id IS NULL"
        if wrong_only:
            q += _WRONG
            params["tolerance"] = tolerance
        if feature_filter is not None:
            op = _OPS.get(feature_filter.op)
            if op is None:
                raise ValueError(f"unsupported filter operator {feature_filter.op!r}")
            # Same JSON type on both sides: jsonb ordering across types would be meaningless.
            q += (
                f" AND (p.input -> %(fname)s) {op} %(fvalue)s::jsonb"
                " AND jsonb_typeof(p.input -> %(fname)s) = jsonb_typeof(%(fvalue)s::jsonb)"
            )
            params["fname"] = feature_filter.name
            params["fvalue"] = Jsonb(feature_filter.value)
        if page_token:
            params["after_ts"], params["after_id"] = decode_page_token(page_token)
            q += " AND (p.created_at, p.prediction_id) > (%(after_ts)s, %(after_id)s)"
        q += " ORDER BY p.created_at, p.prediction_id LIMIT %(limit)s"
        async with self.pool.connection() as conn:
            cur = await conn.execute(q, params)
            rows = [PredictionRow(*r) for r in await cur.fetchall()]
        token = None
        if len(rows) == params["limit"]:
            token = encode_page_token(rows[-1].created_at, rows[-1].prediction_id)
        return rows, token

    async def get_prediction(self, prediction_id: uuid.UUID | str) -> PredictionRow | None:
        """One prediction with its label; uses the UUIDv7 time to touch a single partition."""
        pid = prediction_id if isinstance(prediction_id, uuid.UUID) else uuid.UUID(prediction_id)
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries.GET_PREDICTION, {"id": pid})
            row = await cur.fetchone()
        return PredictionRow(*row) if row is not None else None

    async def stats(self, model: str | None = None, *, raw: bool = False) -> list[ModelStats]:
        """Per model: predictions, labelled predictions, label coverage, ingest lag.

        Read from the rollup's running totals (plus the minutes after them and the stale ones);
        ``raw`` counts every row instead (the reference the rollup is checked against).
        """
        async with self.pool.connection() as conn, conn.transaction():
            # One snapshot for the watermark and the totals: a refresh committing in between
            # would add minutes to the totals that the raw part, reading after the old
            # watermark, counts again.
            await conn.execute(STATS_SNAPSHOT)
            cur = await conn.execute(queries.MATERIALIZED_TO)
            now_row = await cur.fetchone()
            assert now_row is not None
            params = stats_params(model, now_row[0], now_row[2])
            cur = await conn.execute(queries.STATS_RAW if raw else queries.STATS, params)
            rows = await cur.fetchall()
        now: datetime = now_row[1]
        out = []
        for m, n_pred, n_lab, last in rows:
            lag = (now - last).total_seconds() if last is not None else None
            out.append(ModelStats(m, n_pred, n_lab, n_lab / n_pred if n_pred else 0.0, last, lag))
        return out

    async def prediction_stats(
        self, model: str, start: datetime, end: datetime
    ) -> list[MinuteStats]:
        """Per-minute, per-version aggregate (continuous aggregate or the plain-SQL function)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries.PREDICTION_STATS, {"model": model, "start": start, "end": end}
            )
            return [MinuteStats(*r) for r in await cur.fetchall()]
