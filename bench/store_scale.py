"""The STORE section of `bench/scale.py`: how the store's costs grow with its tables.

One scratch database, one `cyclone serve store` process (its own rollup refresh running, as
in production). Predictions are laid out evenly over the last few days, oldest first, in daily
partitions; the table grows through `LogPredictions` in stages (by default 1M -> 10M rows),
a fifth of each stage labelled through `AddLabels`. At each size, after the store's rollup
caught up:

- label join: `AddLabels` of 100 labels for ids drawn from the whole table (each looks its
  prediction up by id and time), p50/p99;
- window read: `GetTrainingData` of the newest 10 minutes (~the same rows at every size),
  labelled and unlabelled, as the monitor reads it;
- status: `GetStats` (all models, the rollup) and the raw count it replaced (same figures,
  psycopg, the floor of "what it cost before");
- dashboard: `ListPredictionStats` of the newest hour.

Floors measured in the same run: binary COPY into a bare table (no index) for ingest; the
smallest size's p99 for growth (reported per 10x rows); a `GetHealth` round trip for
latencies. Disk: bytes per million rows of predictions (heap + indexes), labels and rollup,
and of the same rows as a gzip'd binary COPY (what archiving a dropped day would keep).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from bench._common import Figures, percentile, stop_process
from bench._store_process import scratch_database, start_store_process
from cyclone.store.v1 import store_service_pb2 as pb
from services.store.db import queries
from services.store.db.ingest import prepare_copy_cursor
from services.store.db.partitions import ensure_partitions
from services.store.db.queries import COPY_COLUMNS, COPY_TYPES
from services.store.db.types import PredictionRecord, uuid7, uuid7_time

SERVICE = "/cyclone.store.v1.StoreService/"
MODEL = "scale"
OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]
CITIES = ("lisbon", "porto", "braga", "faro")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("store")
    group.add_argument(
        "--store-sizes",
        default="1000000,10000000",
        help="table sizes (rows) to measure at, ascending; the last is the total ingested"
        " (1M and 10M: ~20 minutes on a shared 2-core machine)",
    )
    group.add_argument(
        "--store-days",
        type=float,
        default=15.0,
        help="days the rows span (15 at 10M rows: the monitor's 10-minute window holds 4,630)",
    )
    group.add_argument("--store-per-message", type=int, default=5000)
    group.add_argument("--store-samples", type=int, default=200, help="calls per latency figure")
    group.add_argument("--store-verbose", action="store_true", help="print every slice")


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Row i is made at start + i * step: the table grows in time order."""

    start: datetime
    step: timedelta
    total: int

    def at(self, i: int) -> datetime:
        return self.start + self.step * i


def _payloads(n: int = 1000) -> list[tuple[bytes, bytes]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        features: dict[str, object] = {f"x{k}": round(rng.gauss(0, 10), 6) for k in range(10)}
        features["city"] = CITIES[i % 4]
        features["segment"] = "abc"[i % 3]
        value = round(rng.uniform(0, 1000), 6)
        out.append((json.dumps(features).encode(), json.dumps({"value": value}).encode()))
    return out


def _messages(layout: Layout, lo: int, hi: int, per_message: int, ids: list[str]) -> list[bytes]:
    """LogPredictions messages for rows [lo, hi); appends their ids to ``ids``."""
    payloads = _payloads()
    out = []
    for first in range(lo, hi, per_message):
        request = pb.LogPredictionsRequest()
        add = request.records.add
        for i in range(first, min(hi, first + per_message)):
            pid = str(uuid7(layout.at(i)))
            ids.append(pid)
            inp, outp = payloads[i % len(payloads)]
            add(
                prediction_id=pid,
                model=MODEL,
                version="1" if i % 10 else "2",
                input_json=inp,
                output_json=outp,
                latency_ms=0.5 + (i % 97) / 10,
            )
        out.append(request.SerializeToString())
    return out


def _label_messages(ids: list[str], per_message: int) -> list[bytes]:
    out = []
    for first in range(0, len(ids), per_message):
        request = pb.AddLabelsRequest(model=MODEL)
        for k, pid in enumerate(ids[first : first + per_message]):
            request.labels.add(prediction_id=pid, number=float(k))
        out.append(request.SerializeToString())
    return out


def _ts(t: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


# --- the database directly ------------------------------------------------------------------


async def _sql(url: str, *statements: str) -> list[tuple[object, ...]]:
    """Run statements in autocommit; the rows of the last."""
    rows: list[tuple[object, ...]] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for s in statements:
            cur = await conn.execute(s.encode())
            rows = list(await cur.fetchall()) if cur.description else []
    return rows


async def _bare_copy_rate(url: str, layout: Layout, n: int) -> float:
    """Rows/s of one binary COPY of n rows into a table without indexes: the ingest floor."""
    payloads = _payloads()
    rows = []
    for i in range(n):
        pid = uuid7(layout.at(i))
        inp, out = payloads[i % len(payloads)]
        rows.append(PredictionRecord(pid, uuid7_time(pid), MODEL, "1", inp, out, 1.0, None))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS bare")
        await conn.execute("CREATE TABLE bare (LIKE predictions)")
        t0 = time.perf_counter()
        async with conn.transaction(), conn.cursor() as cur:
            prepare_copy_cursor(cur)
            sql = f"COPY bare ({COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            async with cur.copy(sql.encode()) as copy:
                copy.set_types(COPY_TYPES)
                for r in rows:
                    await copy.write_row(r)
        seconds = time.perf_counter() - t0
        await conn.execute("DROP TABLE bare")
    return n / seconds


async def _partitions_for(url: str, layout: Layout) -> None:
    """Daily partitions over the whole layout (the store creates them from yesterday on)."""
    first = layout.start.date()
    ahead = (datetime.now(UTC).date() - first).days + 2
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await ensure_partitions(conn, ahead, today=first)


async def _wait_for_rollup(url: str, timeout: float = 600.0) -> float:
    """Seconds until the store's own refresh has no pending minute left."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        rows = await _sql(
            url,
            "SELECT (SELECT count(*) FROM rollup_dirty d, rollup_state s"
            "        WHERE d.lo < s.materialized_to - interval '1 minute')"
            " + (SELECT count(*) FROM rollup_label_delta d, rollup_state s"
            "    WHERE d.bucket < s.materialized_to - interval '1 minute')",
        )
        if rows and rows[0][0] == 0:
            return time.perf_counter() - t0
        await asyncio.sleep(0.5)
    raise RuntimeError("the store's rollup did not catch up")


async def _raw_stats_ms(url: str, samples: int) -> list[float]:
    """The raw-row GetStats query (what status cost before the rollup), in ms."""
    out = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for _ in range(samples):
            t0 = time.perf_counter()
            await (await conn.execute(queries.STATS_RAW, {"model": None})).fetchall()
            out.append((time.perf_counter() - t0) * 1000)
    return out


async def _disk(url: str) -> dict[str, int]:
    rows = await _sql(
        url,
        "SELECT"
        " (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('predictions')),"
        " pg_total_relation_size('labels'), pg_total_relation_size('prediction_rollup_1m'),"
        " (SELECT count(*) FROM predictions)",
    )
    predictions, labels, rollup, count = (int(str(v or 0)) for v in rows[0])
    return {"predictions": predictions, "labels": labels, "rollup": rollup, "rows": count}


async def _archived_bytes(url: str, limit: int) -> tuple[int, int]:
    """(rows, gzip'd bytes) of a binary COPY of the oldest ``limit`` predictions."""
    level6 = gzip.compress
    chunks: list[bytes] = []
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor() as cur:
        q = (
            "COPY (SELECT * FROM predictions ORDER BY created_at LIMIT "
            + str(int(limit))
            + ") TO STDOUT (FORMAT BINARY)"
        )
        async with cur.copy(q.encode()) as copy:
            async for data in copy:
                chunks.append(bytes(data))
    return limit, len(level6(b"".join(chunks), compresslevel=6))


# --- through the store ------------------------------------------------------------------------


async def _log(channel: aio.Channel, messages: list[bytes], rows: int) -> float:
    call = channel.stream_unary(
        SERVICE + "LogPredictions", response_deserializer=pb.LogPredictionsResponse.FromString
    )

    async def requests() -> AsyncIterator[bytes]:
        for m in messages:
            yield m

    t0 = time.perf_counter()
    response: pb.LogPredictionsResponse = await call(requests())
    seconds = time.perf_counter() - t0
    assert (response.received, response.inserted) == (rows, rows), response
    return seconds


async def _unary(channel: aio.Channel, method: str, request: bytes, reply: type) -> object:
    call = channel.unary_unary(SERVICE + method, response_deserializer=reply.FromString)  # type: ignore[attr-defined]
    return await call(request)


async def _latencies(fn: Callable[[], Awaitable[object]], samples: int) -> list[float]:
    await fn()  # warm
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _register(channel: aio.Channel) -> None:
    schema = {
        "features": [{"name": f"x{k}", "kind": "numeric"} for k in range(10)]
        + [{"name": n, "kind": "categorical"} for n in ("city", "segment")]
    }
    mv = pb.ModelVersion(
        model=MODEL, version="1", task="regression", sha256="0" * 64, schema_json=json.dumps(schema)
    )
    request = pb.RegisterModelVersionRequest(model_version=mv, if_not_exists=True)
    await _unary(
        channel,
        "RegisterModelVersion",
        request.SerializeToString(),
        pb.RegisterModelVersionResponse,
    )


@dataclass
class Stage:
    rows: int
    ingest_rate: float
    label_rate: float
    rollup_catch_up_s: float
    label_ms: list[float]
    window_ms: list[float]
    window_rows: int
    status_ms: list[float]
    raw_status_ms: list[float]
    dashboard_ms: list[float]
    floor_ms: list[float]


async def _measure(
    channel: aio.Channel, url: str, layout: Layout, ids: list[str], size: int, samples: int
) -> tuple[list[float], ...]:
    rng = random.Random(size)
    newest = layout.at(size - 1)

    async def label() -> object:
        request = pb.AddLabelsRequest(model=MODEL)
        for pid in rng.sample(ids, 100):
            request.labels.add(prediction_id=pid, number=1.0)
        return await _unary(channel, "AddLabels", request.SerializeToString(), pb.AddLabelsResponse)

    window_rows = 0
    window_request = pb.GetTrainingDataRequest(
        model=MODEL,
        start=_ts(newest - timedelta(minutes=10)),
        end=_ts(newest + timedelta(seconds=1)),
        include_unlabelled=True,
    ).SerializeToString()
    read = channel.unary_stream(
        SERVICE + "GetTrainingData", response_deserializer=pb.GetTrainingDataResponse.FromString
    )

    async def window() -> object:
        nonlocal window_rows
        window_rows = 0
        async for chunk in read(window_request):
            window_rows += len(chunk.prediction_ids)
        return window_rows

    stats_request = pb.GetStatsRequest().SerializeToString()
    dashboard_request = pb.ListPredictionStatsRequest(
        model=MODEL, start=_ts(newest - timedelta(hours=1)), end=_ts(newest + timedelta(seconds=1))
    ).SerializeToString()
    health_request = pb.GetHealthRequest().SerializeToString()

    label_ms = await _latencies(label, samples)
    window_ms = await _latencies(window, max(20, samples // 4))
    status_ms = await _latencies(
        lambda: _unary(channel, "GetStats", stats_request, pb.GetStatsResponse), samples
    )
    dashboard_ms = await _latencies(
        lambda: _unary(
            channel, "ListPredictionStats", dashboard_request, pb.ListPredictionStatsResponse
        ),
        samples,
    )
    floor_ms = await _latencies(
        lambda: _unary(channel, "GetHealth", health_request, pb.GetHealthResponse), samples
    )
    raw_ms = await _raw_stats_ms(url, max(3, samples // 50))
    return label_ms, window_ms, status_ms, dashboard_ms, floor_ms, raw_ms, [float(window_rows)]


def _growth_per_10x(small: float, large: float, rows_small: int, rows_large: int) -> float:
    decades = math.log10(rows_large / rows_small)
    return (large / small) ** (1 / decades) if decades > 0 else float("nan")


async def _run(args: argparse.Namespace, figures: Figures, url: str, address: str) -> None:
    sizes = [int(s) for s in str(args.store_sizes).split(",")]
    total = sizes[-1]
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    span = timedelta(days=args.store_days)
    layout = Layout(end - span, span / total, total)
    await _partitions_for(url, layout)
    # The ingest floor is measured before every stage (the machine's load moves); the best is
    # kept, so the ratio is against the fastest the machine showed in this run.
    floor_rates: list[float] = []
    ids: list[str] = []
    stages: list[Stage] = []
    async with aio.insecure_channel(address, options=OPTIONS) as channel:
        await _register(channel)
        done = 0
        for size in sizes:
            floor_rates.append(await _bare_copy_rate(url, layout, min(100_000, total)))
            print(f"floor: binary COPY into a bare table {floor_rates[-1]:,.0f} rows/s", flush=True)
            logged_seconds = 0.0
            label_seconds = 0.0
            labelled = 0
            # Build and send in slices, so memory stays bounded and building is not timed.
            for lo in range(done, size, 200_000):
                hi = min(size, lo + 200_000)
                first_new = len(ids)
                messages = _messages(layout, lo, hi, args.store_per_message, ids)
                logged_seconds += await _log(channel, messages, hi - lo)
                to_label = ids[first_new::5]
                label_msgs = _label_messages(to_label, args.store_per_message)
                t0 = time.perf_counter()
                for m in label_msgs:
                    await _unary(channel, "AddLabels", m, pb.AddLabelsResponse)
                label_seconds += time.perf_counter() - t0
                if args.store_verbose:
                    print(
                        f"  rows {lo:,}-{hi:,}: labels {len(to_label) / (time.perf_counter() - t0):,.0f}/s",
                        flush=True,
                    )
                labelled += len(to_label)
            rate = (size - done) / logged_seconds
            label_rate = labelled / label_seconds if label_seconds else float("nan")
            done = size
            await _sql(url, "VACUUM ANALYZE predictions", "VACUUM ANALYZE labels")
            catch_up = await _wait_for_rollup(url)
            label_ms, window_ms, status_ms, dashboard_ms, floor_ms, raw_ms, wrows = await _measure(
                channel, url, layout, ids, size, args.store_samples
            )
            await _wait_for_rollup(url)
            stage = Stage(
                size,
                rate,
                label_rate,
                catch_up,
                label_ms,
                window_ms,
                int(wrows[0]),
                status_ms,
                raw_ms,
                dashboard_ms,
                floor_ms,
            )
            stages.append(stage)
            print(
                f"{size:>11,} rows: ingest {rate:,.0f} rows/s, labels {label_rate:,.0f}/s,"
                f" rollup caught up in {catch_up:.1f} s; p99 ms: AddLabels(100) "
                f"{percentile(label_ms, 0.99):.1f}, window ({stage.window_rows} rows) "
                f"{percentile(window_ms, 0.99):.1f}, GetStats {percentile(status_ms, 0.99):.1f}"
                f" (raw count {percentile(raw_ms, 0.99):.0f}), ListPredictionStats 1h "
                f"{percentile(dashboard_ms, 0.99):.1f}, GetHealth {percentile(floor_ms, 0.99):.1f}",
                flush=True,
            )
        disk = await _disk(url)
        archived_rows, archived = await _archived_bytes(url, min(500_000, total))

    floor_rate = max(floor_rates)
    first, last = stages[0], stages[-1]
    sustained = total / sum(s.rows / s.ingest_rate for s in _increments(stages))
    figures.add("store_ingest_sustained", sustained, "rows/s", floor_rate, True)
    figures.add("store_ingest_at_largest", last.ingest_rate, "rows/s", floor_rate, True)
    for name, pick in (
        ("label_join_p99", lambda s: s.label_ms),
        ("window_read_p99", lambda s: s.window_ms),
        ("status_p99", lambda s: s.status_ms),
        ("dashboard_p99", lambda s: s.dashboard_ms),
    ):
        small, large = percentile(pick(first), 0.99), percentile(pick(last), 0.99)
        growth = _growth_per_10x(small, large, first.rows, last.rows)
        # Value: the growth per 10x rows; floor 1.0 (flat). Ratio < 1 means it grew.
        figures.add(f"store_{name}_growth_per_10x", growth, "x", 1.0, False)
        figures.add(
            f"store_{name}_at_{last.rows}",
            large,
            "ms",
            percentile(last.floor_ms, 0.99),
            False,
        )
    figures.add(
        f"store_status_rollup_vs_raw_at_{last.rows}",
        percentile(last.status_ms, 0.99),
        "ms",
        percentile(last.raw_status_ms, 0.99),
        False,
    )
    per_million = 1e6 / max(1, disk["rows"])
    table = (disk["predictions"] + disk["labels"] + disk["rollup"]) * per_million / 1e6
    archive = archived * 1e6 / archived_rows / 1e6
    print(
        f"disk per million rows: predictions {disk['predictions'] * per_million / 1e6:.0f} MB"
        f" (heap + indexes), labels {disk['labels'] * per_million / 1e6:.0f} MB (a fifth"
        f" labelled), rollup {disk['rollup'] * per_million / 1e6:.2f} MB; archived (gzip'd"
        f" binary COPY) {archive:.0f} MB",
        flush=True,
    )
    figures.add("store_disk_mb_per_million_rows", table, "MB", table, False)
    figures.add("store_archive_mb_per_million_rows", archive, "MB", table, False)


def _increments(stages: list[Stage]) -> list[Stage]:
    """Each stage with `rows` = the rows it added (for the sustained rate)."""
    out, before = [], 0
    for s in stages:
        out.append(Stage(s.rows - before, *[getattr(s, f) for f in _FIELDS[1:]]))
        before = s.rows
    return out


_FIELDS = list(Stage.__dataclass_fields__)


def run(args: argparse.Namespace, figures: Figures) -> None:
    with scratch_database() as url:
        store, address = start_store_process(url)
        try:
            asyncio.run(_run(args, figures, url, address))
        finally:
            stop_process(store)


__all__ = ["add_arguments", "run"]
