"""The STORE section of `bench/scale.py`: how the store's costs grow with its tables.

One scratch database, one `cyclone serve store` process (its own rollup refresh running, as
in production; retention off, so the oldest days stay). Predictions are laid out evenly over
the last days (1.5 days per million rows of the largest size: the same rows per minute at every
size), oldest first, in daily partitions. The table grows in stages (by default 1M -> 10M ->
50M rows): the newest `--store-stretch` rows of each stage (2M) go through `LogPredictions`,
which is the ingest measured; the older ones are seeded straight into the database with the
store's binary COPY encoding (`copy_binary`), a transaction per slice that also copies the
slice's labels and marks its span for the rollup, as the store's ingest does. A fifth of the
rows is labelled (through `AddLabels` for the stretch). At each size, after the store's rollup
caught up:

- label join: `AddLabels` of 100 labels for ids drawn from the whole table (each looks its
  prediction up by id and time), p50/p99;
- window read: `GetTrainingData` of the newest 10 minutes (~the same rows at every size),
  labelled and unlabelled, as the monitor reads it;
- status: `GetStats` (all models: the rollup's running totals), and on the database directly
  (psycopg) the same query, the query before the totals (every rollup minute summed) and the
  raw count before the rollup, all three checked to give the same figures in one snapshot;
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
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import NamedTuple

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from bench._common import Figures, percentile, stop_process
from bench._store_process import scratch_database, start_store_process
from cyclone.store.v1 import store_service_pb2 as pb
from services.store.db import queries
from services.store.db.copy_binary import encode_predictions
from services.store.db.ingest import prepare_copy_cursor
from services.store.db.partitions import ensure_partitions
from services.store.db.queries import COPY_COLUMNS, COPY_TYPES
from services.store.db.reads import STATS_SNAPSHOT, stats_params
from services.store.db.rollup import mark_dirty
from services.store.db.types import EPOCH, PredictionRecord, uuid7_time

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
        default="1000000,10000000,50000000",
        help="table sizes (rows) to measure at, ascending; the last is the total stored"
        " (~0.5 GB of disk per million rows)",
    )
    group.add_argument(
        "--store-days",
        type=float,
        default=None,
        help="days the rows span; default 1.5 per million rows of the largest size, so the"
        " monitor's 10-minute window holds ~4,630 rows at every size",
    )
    group.add_argument(
        "--store-stretch",
        type=int,
        default=2_000_000,
        help="rows of each stage sent through LogPredictions (the ingest measured); older rows"
        " of the stage are seeded by binary COPY straight into the database",
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

    @cached_property
    def _start_us(self) -> int:
        return (self.start - EPOCH) // timedelta(microseconds=1)

    @cached_property
    def _step_us(self) -> int:
        return self.step // timedelta(microseconds=1)

    def pid(self, i: int) -> str:
        """Row i's id: a UUIDv7 of its millisecond (that of `at(i)`) whose random bits are i:
        unique, and recomputable, so no list of 50M ids is kept to sample labels from. Integer
        arithmetic and one format: seeding 50M rows is bound by this Python."""
        ms = (self._start_us + self._step_us * i) // 1000
        h = f"{ms:012x}7{i >> 62 & 0xFFF:03x}{1 << 63 | i & ((1 << 62) - 1):016x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _version(i: int) -> str:
    return "1" if i % 10 else "2"


def _latency(i: int) -> float:
    return 0.5 + (i % 97) / 10


def _labelled(lo: int, hi: int) -> range:
    """The rows of [lo, hi) that get a label: a fifth."""
    return range(lo + (-lo % 5), hi, 5)


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


def _messages(layout: Layout, lo: int, hi: int, per_message: int) -> list[bytes]:
    """LogPredictions messages for rows [lo, hi)."""
    payloads = _payloads()
    out = []
    for first in range(lo, hi, per_message):
        request = pb.LogPredictionsRequest()
        add = request.records.add
        for i in range(first, min(hi, first + per_message)):
            inp, outp = payloads[i % len(payloads)]
            add(
                prediction_id=layout.pid(i),
                model=MODEL,
                version=_version(i),
                input_json=inp,
                output_json=outp,
                latency_ms=_latency(i),
            )
        out.append(request.SerializeToString())
    return out


class _SeedRecord(NamedTuple):
    """What `copy_binary.encode_predictions` reads of a record (as the wire's)."""

    prediction_id: str
    model: str
    version: str
    input_json: bytes
    output_json: bytes
    latency_ms: float
    trace_id: str


def _seed_slice(layout: Layout, lo: int, hi: int) -> tuple[bytes, bytes, datetime, datetime]:
    """Rows [lo, hi) as the store's binary COPY payload, their labels as COPY text, their span."""
    payloads = _payloads()
    n = len(payloads)
    records = (
        _SeedRecord(layout.pid(i), MODEL, _version(i), *payloads[i % n], _latency(i), "")
        for i in range(lo, hi)
    )
    payload = encode_predictions(records)
    labels = "".join(
        f"{layout.pid(i)}\t{k % 5000}\t{MODEL}\n" for k, i in enumerate(_labelled(lo, hi))
    ).encode()
    return payload.data, labels, uuid7_time(layout.pid(lo)), uuid7_time(layout.pid(hi - 1))


def _label_messages(ids: list[str], per_message: int) -> list[bytes]:
    """AddLabels messages, numbered as the seeded labels are (the k-th of a slice: k)."""
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
        pid = uuid.UUID(layout.pid(i))
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


_SEED_SLICE = 250_000


async def _seed(url: str, layout: Layout, lo: int, hi: int) -> float:
    """Rows [lo, hi) and a fifth of their labels straight into the database; rows/s.

    Each slice is one transaction, like a store ingest batch: binary COPY of the rows, COPY of
    their labels, and the slice's span marked for the rollup (the store's refresh, running
    alongside, aggregates it). The next slice is encoded in a thread while this one is copied.
    """
    sql = f"COPY predictions ({COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)".encode()
    t0 = time.perf_counter()
    bounds = [(a, min(hi, a + _SEED_SLICE)) for a in range(lo, hi, _SEED_SLICE)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        pending = asyncio.ensure_future(asyncio.to_thread(_seed_slice, layout, *bounds[0]))
        for k in range(len(bounds)):
            payload, labels, first, last = await pending
            if k + 1 < len(bounds):
                pending = asyncio.ensure_future(
                    asyncio.to_thread(_seed_slice, layout, *bounds[k + 1])
                )
            async with conn.transaction(), conn.cursor() as cur:
                async with cur.copy(sql) as copy:
                    await copy.write(payload)
                async with cur.copy(b"COPY labels (prediction_id, label, model) FROM STDIN") as c:
                    await c.write(labels)
                await mark_dirty(conn, first, last)
    return (hi - lo) / (time.perf_counter() - t0)


async def _status_on_database(
    url: str, samples: int, *, raw: bool
) -> tuple[list[float], list[float], list[float]]:
    """ms per call on the database directly: status (the running totals) and the status query
    before them (every rollup minute summed), each with its watermark read in the same
    snapshot as GetStats does; then, if ``raw``, one raw count. Checks all agree."""

    async def once(query: str) -> tuple[float, list[tuple[object, ...]]]:
        t0 = time.perf_counter()
        async with conn.transaction():
            await conn.execute(STATS_SNAPSHOT)
            row = await (await conn.execute(queries.MATERIALIZED_TO)).fetchone()
            assert row is not None
            params = stats_params(None, row[0], row[2])
            rows = list(await (await conn.execute(query, params)).fetchall())
        return (time.perf_counter() - t0) * 1000, rows

    totals_ms: list[float] = []
    scan_ms: list[float] = []
    raw_ms: list[float] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SET jit = off")  # as the store's connections
        for query, out in ((queries.STATS, totals_ms), (queries.STATS_ROLLUP_SCAN, scan_ms)):
            await once(query)  # warm
            for _ in range(samples):
                out.append((await once(query))[0])
        # The three answers from one snapshot: nothing may differ.
        async with conn.transaction():
            await conn.execute(STATS_SNAPSHOT)
            row = await (await conn.execute(queries.MATERIALIZED_TO)).fetchone()
            assert row is not None
            params = stats_params(None, row[0], row[2])
            answers = [
                list(await (await conn.execute(queries.STATS, params)).fetchall()),
                list(await (await conn.execute(queries.STATS_ROLLUP_SCAN, params)).fetchall()),
            ]
            if raw:
                t0 = time.perf_counter()
                answers.append(
                    list(await (await conn.execute(queries.STATS_RAW, params)).fetchall())
                )
                raw_ms.append((time.perf_counter() - t0) * 1000)
        if any(a != answers[0] for a in answers):
            raise AssertionError(f"status paths disagree: {answers}")
    return totals_ms, scan_ms, raw_ms


async def _label_pages(url: str, layout: Layout, size: int, calls: int = 30) -> str:
    """What a label join touches, server-side: the store's label upsert for 100 ids drawn
    from the whole table, under EXPLAIN (ANALYZE, BUFFERS), rolled back. Pages touched per
    label (hit + read) is the algorithm's cost; pages read from outside shared buffers is the
    memory's; execution ms follows the second once the table outgrows the cache."""
    rng = random.Random(size + 1)
    touched, read, exec_ms = [], [], []
    sql = ("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.UPSERT_LABELS).encode()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET jit = off")
        await conn.rollback()
        for _ in range(calls):
            ids = [layout.pid(i) for i in rng.sample(range(size), 100)]
            await conn.execute("SET LOCAL enable_seqscan = off")  # as the store's upsert
            cur = await conn.execute(sql, {"ids": ids, "labels": ["1"] * 100, "model": None})
            row = await cur.fetchone()
            await conn.rollback()
            assert row is not None
            plan = row[0][0]
            hit, miss = plan["Plan"]["Shared Hit Blocks"], plan["Plan"]["Shared Read Blocks"]
            touched.append((hit + miss) / 100)
            read.append(float(miss))
            exec_ms.append(plan["Execution Time"])
    return (
        f"label upsert server-side (p50/p99): pages touched per label {_p(touched)}, pages"
        f" read from outside shared buffers per 100 labels {_p(read)}, execution ms"
        f" {_p(exec_ms)}"
    )


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
    db_status_ms: list[float]
    db_scan_status_ms: list[float]
    seeded_rows: int = 0
    seed_rate: float = float("nan")
    load: tuple[float, float] = (float("nan"), float("nan"))


async def _measure(
    channel: aio.Channel, url: str, layout: Layout, size: int, samples: int
) -> tuple[list[float], ...]:
    rng = random.Random(size)
    newest = layout.at(size - 1)

    async def label() -> object:
        request = pb.AddLabelsRequest(model=MODEL)
        for i in rng.sample(range(size), 100):
            request.labels.add(prediction_id=layout.pid(i), number=1.0)
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
    # The raw count is a full scan (~10 s at 10M rows): a few samples, one above 10M.
    print("    " + await _label_pages(url, layout, size), flush=True)
    raw_samples = max(3, samples // 50) if size <= 10_000_000 else 1
    db_ms: list[float] = []
    scan_ms: list[float] = []
    raw_ms: list[float] = []
    for k in range(raw_samples):
        t, s, r = await _status_on_database(url, samples if k == 0 else 0, raw=True)
        db_ms += t
        scan_ms += s
        raw_ms += r
    return (
        label_ms,
        window_ms,
        status_ms,
        dashboard_ms,
        floor_ms,
        raw_ms,
        [float(window_rows)],
        db_ms,
        scan_ms,
    )


def _growth_per_10x(small: float, large: float, rows_small: int, rows_large: int) -> float:
    decades = math.log10(rows_large / rows_small)
    return (large / small) ** (1 / decades) if decades > 0 else float("nan")


def _p(values: list[float]) -> str:
    return f"{percentile(values, 0.5):.1f}/{percentile(values, 0.99):.1f}"


async def _run(args: argparse.Namespace, figures: Figures, url: str, address: str) -> None:
    sizes = [int(s) for s in str(args.store_sizes).split(",")]
    total = sizes[-1]
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    days = args.store_days if args.store_days is not None else 1.5 * total / 1e6
    span = timedelta(days=days)
    layout = Layout(end - span, span / total, total)
    await _partitions_for(url, layout)
    # The ingest floor is measured before every stage (the machine's load moves); the best is
    # kept, so the ratio is against the fastest the machine showed in this run.
    floor_rates: list[float] = []
    stages: list[Stage] = []
    logged_rows, logged_total_s = 0, 0.0
    async with aio.insecure_channel(address, options=OPTIONS) as channel:
        await _register(channel)
        done = 0
        for size in sizes:
            t_stage = time.perf_counter()
            floor_rates.append(await _bare_copy_rate(url, layout, min(100_000, total)))
            print(f"floor: binary COPY into a bare table {floor_rates[-1]:,.0f} rows/s", flush=True)
            stretch_from = max(done, size - args.store_stretch)
            seed_rate = float("nan")
            if stretch_from > done:
                seed_rate = await _seed(url, layout, done, stretch_from)
                print(
                    f"  seeded rows {done:,}-{stretch_from:,} by binary COPY at {seed_rate:,.0f}"
                    f" rows/s (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
            logged_seconds = 0.0
            label_seconds = 0.0
            labelled = 0
            # Build and send in slices, so memory stays bounded and building is not timed.
            for lo in range(stretch_from, size, 200_000):
                hi = min(size, lo + 200_000)
                messages = _messages(layout, lo, hi, args.store_per_message)
                logged_seconds += await _log(channel, messages, hi - lo)
                to_label = [layout.pid(i) for i in _labelled(lo, hi)]
                label_msgs = _label_messages(to_label, args.store_per_message)
                t0 = time.perf_counter()
                for m in label_msgs:
                    await _unary(channel, "AddLabels", m, pb.AddLabelsResponse)
                label_seconds += time.perf_counter() - t0
                if args.store_verbose:
                    print(
                        f"  rows {lo:,}-{hi:,}: labels"
                        f" {len(to_label) / (time.perf_counter() - t0):,.0f}/s",
                        flush=True,
                    )
                labelled += len(to_label)
            rate = (size - stretch_from) / logged_seconds
            logged_rows += size - stretch_from
            logged_total_s += logged_seconds
            label_rate = labelled / label_seconds if label_seconds else float("nan")
            seeded = stretch_from - done
            done = size
            t0 = time.perf_counter()
            await _sql(url, "VACUUM ANALYZE predictions", "VACUUM ANALYZE labels")
            vacuum_s = time.perf_counter() - t0
            catch_up = await _wait_for_rollup(url)
            load_before = os.getloadavg()[0]
            (
                label_ms,
                window_ms,
                status_ms,
                dashboard_ms,
                floor_ms,
                raw_ms,
                wrows,
                db_ms,
                scan_ms,
            ) = await _measure(channel, url, layout, size, args.store_samples)
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
                db_ms,
                scan_ms,
                seeded,
                seed_rate,
                (load_before, os.getloadavg()[0]),
            )
            stages.append(stage)
            print(
                f"{size:>11,} rows ({seeded:,} seeded): ingest {rate:,.0f} rows/s through"
                f" LogPredictions, labels {label_rate:,.0f}/s, VACUUM ANALYZE {vacuum_s:.0f} s,"
                f" rollup caught up in {catch_up:.1f} s, stage {time.perf_counter() - t_stage:.0f}"
                f" s, load average {stage.load[0]:.1f} -> {stage.load[1]:.1f}\n"
                f"    p50/p99 ms: AddLabels(100) {_p(label_ms)}, window ({stage.window_rows}"
                f" rows) {_p(window_ms)}, GetStats {_p(status_ms)}, ListPredictionStats 1h"
                f" {_p(dashboard_ms)}, GetHealth {_p(floor_ms)}\n"
                f"    on the database: status (totals) {_p(db_ms)}, status before the totals"
                f" (rollup summed) {_p(scan_ms)}, raw count {_p(raw_ms)} (same figures)",
                flush=True,
            )
        disk = await _disk(url)
        archived_rows, archived = await _archived_bytes(url, min(500_000, total))

    floor_rate = max(floor_rates)
    first, last = stages[0], stages[-1]
    sustained = logged_rows / logged_total_s
    figures.add("store_ingest_sustained", sustained, "rows/s", floor_rate, True)
    figures.add("store_ingest_at_largest", last.ingest_rate, "rows/s", floor_rate, True)
    picks: list[tuple[str, Callable[[Stage], list[float]]]] = [
        ("label_join_p99", lambda s: s.label_ms),
        ("window_read_p99", lambda s: s.window_ms),
        ("status_p99", lambda s: s.status_ms),
        ("dashboard_p99", lambda s: s.dashboard_ms),
        ("status_on_database_p99", lambda s: s.db_status_ms),
        ("status_before_totals_on_database_p99", lambda s: s.db_scan_status_ms),
    ]
    for name, pick in picks:
        small, large = percentile(pick(first), 0.99), percentile(pick(last), 0.99)
        growth = _growth_per_10x(small, large, first.rows, last.rows)
        # Value: the growth per 10x rows; floor 1.0 (flat). Ratio < 1 means it grew.
        figures.add(f"store_{name}_growth_per_10x", growth, "x", 1.0, False)
        for stage in stages[:-1]:
            figures.add(
                f"store_{name}_at_{stage.rows}",
                percentile(pick(stage), 0.99),
                "ms",
                percentile(stage.floor_ms, 0.99),
                False,
            )
        figures.add(
            f"store_{name}_at_{last.rows}",
            large,
            "ms",
            percentile(last.floor_ms, 0.99),
            False,
        )
    figures.add(
        f"store_status_totals_vs_rollup_sum_at_{last.rows}",
        percentile(last.db_status_ms, 0.99),
        "ms",
        percentile(last.db_scan_status_ms, 0.99),
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


def run(args: argparse.Namespace, figures: Figures) -> None:
    with scratch_database() as url:
        # Retention off: the layout reaches further back than the 30 days kept by default.
        store, address = start_store_process(url, "--retention-days", "0")
        try:
            asyncio.run(_run(args, figures, url, address))
        finally:
            stop_process(store)


__all__ = ["add_arguments", "run"]
