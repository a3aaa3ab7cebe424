"""Store benchmark: the gRPC store against raw psycopg on the same PostgreSQL.

(a) floor: raw binary COPY of N synthetic predictions (12-feature input JSON, output JSON) into
    `predictions`, one connection, in-process;
(b) the same N rows through `LogPredictions` on a store server subprocess (messages of 5000
    records, serialized before timing);
(c) labels through `AddLabels` (5000 per call); floor = the raw COPY rows/s of (a);
(d) a `GetTrainingData` stream of the N labelled rows; floor = a raw psycopg SELECT of the same
    rows (same query, server-side binary cursor, no JSON decoding);
(e) `Predict` throughput of an inference server subprocess with prediction logging on
    (`--store`) vs off, concurrency 8; floor = logging off.

PostgreSQL: $CYCLONE_DATABASE_URL (a scratch database is created there and dropped after) or an
embedded server in a temp dir with fsync off.

Usage: python -m bench.store [--rows 100000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
from grpc import aio

from bench._common import PYTHON, ROOT, Figures, free_port, start_process, stop_process
from bench._store_process import scratch_database, start_store_process
from bench.inference import predict_payload, unary_load
from cyclone.models.convert import import_pipeline
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone_app.examples import bench_regressor
from services.store.db import PredictionRecord, uuid7, uuid7_time
from services.store.db.ingest import prepare_copy_cursor
from services.store.db.queries import COPY_COLUMNS, COPY_TYPES, training_query

SERVICE = "/cyclone.store.v1.StoreService/"
PREDICT = "/cyclone.inference.v1.InferenceService/Predict"
MODEL = "bench"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]
CITIES = ("lisbon", "porto", "braga", "faro")


# --- data ----------------------------------------------------------------------------------


def make_rows(n: int, start: datetime) -> list[PredictionRecord]:
    """n predictions of a 12-feature model (10 numeric, 2 categorical), one per 10 ms."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        pid = uuid7(start + timedelta(milliseconds=10 * i))
        features: dict[str, object] = {f"x{k}": round(rng.gauss(0, 10), 6) for k in range(10)}
        features["city"] = CITIES[i % 4]
        features["segment"] = "abc"[i % 3]
        inp = json.dumps(features).encode()
        out = json.dumps({"value": round(rng.uniform(0, 1000), 6)}).encode()
        rows.append(PredictionRecord(pid, uuid7_time(pid), MODEL, "1", inp, out, 0.8, None))
    return rows


def log_messages(rows: list[PredictionRecord], per_message: int) -> list[bytes]:
    out = []
    for i in range(0, len(rows), per_message):
        request = pb.LogPredictionsRequest()
        add = request.records.add
        for r in rows[i : i + per_message]:
            add(
                prediction_id=str(r.prediction_id),
                model=r.model,
                version=r.version,
                input_json=r.input_json,
                output_json=r.output_json,
                latency_ms=r.latency_ms,
            )
        out.append(request.SerializeToString())
    return out


def label_messages(rows: list[PredictionRecord], per_message: int) -> list[bytes]:
    out = []
    for i in range(0, len(rows), per_message):
        request = pb.AddLabelsRequest(model=MODEL)
        for k, r in enumerate(rows[i : i + per_message]):
            request.labels.add(prediction_id=str(r.prediction_id), number=float(i + k))
        out.append(request.SerializeToString())
    return out


# --- raw psycopg floors --------------------------------------------------------------------


async def truncate(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE predictions, labels")
        await conn.execute("VACUUM ANALYZE predictions")


async def raw_copy(url: str, rows: list[PredictionRecord]) -> float:
    """Seconds for one binary COPY of `rows` (the ingest floor)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        async with conn.transaction(), conn.cursor() as cur:
            prepare_copy_cursor(cur)
            async with cur.copy(
                f"COPY predictions ({COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)".encode()
            ) as copy:
                copy.set_types(COPY_TYPES)
                for r in rows:
                    await copy.write_row(r)
        return time.perf_counter() - t0


async def raw_select(url: str, chunk_rows: int = 10_000) -> tuple[int, float]:
    """Rows and seconds for the training query through a server-side cursor (the read floor)."""
    q = training_query(window=True, last_n=False, version=False)
    params = {
        "model": MODEL,
        "start": datetime(1970, 1, 1, tzinfo=UTC),
        "end": datetime.now(UTC) + timedelta(days=1),
    }
    async with await psycopg.AsyncConnection.connect(url) as conn:
        t0 = time.perf_counter()
        got = 0
        async with conn.transaction(), conn.cursor(name="bench", binary=True) as cur:
            cur.itersize = chunk_rows
            await cur.execute(q, params)
            while rows := await cur.fetchmany(chunk_rows):
                got += len(rows)
        return got, time.perf_counter() - t0


async def count(url: str, table: str, model: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE model = %s", (model,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def vacuum(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE predictions")
        await conn.execute("VACUUM ANALYZE labels")


# --- through the store ----------------------------------------------------------------------


async def log_predictions(
    address: str, messages: list[bytes]
) -> tuple[float, pb.LogPredictionsResponse]:
    async with aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary(
            SERVICE + "LogPredictions", response_deserializer=pb.LogPredictionsResponse.FromString
        )

        async def requests() -> AsyncIterator[bytes]:
            for m in messages:
                yield m

        t0 = time.perf_counter()
        response: pb.LogPredictionsResponse = await call(requests())
        return time.perf_counter() - t0, response


async def add_labels(address: str, messages: list[bytes]) -> tuple[float, int]:
    async with aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(
            SERVICE + "AddLabels", response_deserializer=pb.AddLabelsResponse.FromString
        )
        stored = 0
        t0 = time.perf_counter()
        for m in messages:
            stored += (await call(m)).stored
        return time.perf_counter() - t0, stored


async def register(address: str) -> None:
    schema = {
        "features": [{"name": f"x{k}", "kind": "numeric"} for k in range(10)]
        + [{"name": n, "kind": "categorical"} for n in ("city", "segment")]
    }
    async with aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            SERVICE + "RegisterModelVersion",
            request_serializer=pb.RegisterModelVersionRequest.SerializeToString,
            response_deserializer=pb.RegisterModelVersionResponse.FromString,
        )
        mv = pb.ModelVersion(
            model=MODEL,
            version="1",
            task="regression",
            sha256="0" * 64,
            schema_json=json.dumps(schema),
        )
        await call(pb.RegisterModelVersionRequest(model_version=mv, if_not_exists=True))


async def training_data(address: str) -> tuple[int, float, int]:
    """Rows, seconds and chunks of one GetTrainingData stream of everything labelled."""
    async with aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_stream(
            SERVICE + "GetTrainingData",
            request_serializer=pb.GetTrainingDataRequest.SerializeToString,
            response_deserializer=pb.GetTrainingDataResponse.FromString,
        )
        rows = chunks = 0
        t0 = time.perf_counter()
        async for chunk in call(pb.GetTrainingDataRequest(model=MODEL)):
            rows += len(chunk.prediction_ids)
            chunks += 1
        return rows, time.perf_counter() - t0, chunks


# --- orchestration ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.rows
    figures = Figures()

    with scratch_database() as url, tempfile.TemporaryDirectory(prefix="cyclone-bench-") as tmp:
        store, address = start_store_process(url)
        try:
            rows = make_rows(n, datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
            messages = log_messages(rows, args.per_message)
            labels = label_messages(rows, args.per_message)
            print(
                f"{n} rows, input JSON ~{len(rows[0].input_json)} B, output ~{len(rows[0].output_json)} B;"
                f" {len(messages)} LogPredictions messages of {args.per_message}"
                f" ({sum(map(len, messages)) / len(messages) / 1e6:.1f} MB each)"
            )

            # (a) + (b): alternate, best of `repeats`.
            floor_rates, store_rates = [], []
            for _ in range(args.repeats):
                asyncio.run(truncate(url))
                floor_rates.append(n / asyncio.run(raw_copy(url, rows)))
                asyncio.run(truncate(url))
                seconds, response = asyncio.run(log_predictions(address, messages))
                assert (response.received, response.inserted) == (n, n), response
                store_rates.append(n / seconds)
            copy_floor, store_rate = max(floor_rates), max(store_rates)
            print(
                f"raw binary COPY (floor)        {copy_floor:>10,.0f} rows/s  runs {[round(r) for r in floor_rates]}"
            )
            print(
                f"LogPredictions                 {store_rate:>10,.0f} rows/s  runs {[round(r) for r in store_rates]}"
                f"  ratio {store_rate / copy_floor:.2f} (target >= 0.8)"
            )
            assert asyncio.run(count(url, "predictions", MODEL)) == n

            # Idempotent replay of everything (all duplicates): the de-duplication path.
            seconds, response = asyncio.run(log_predictions(address, messages))
            assert response.inserted == 0, response
            print(
                f"LogPredictions replay (dupes)  {n / seconds:>10,.0f} rows/s  (stored 0 of {response.received})"
            )

            # (c) labels.
            asyncio.run(register(address))
            seconds, stored = asyncio.run(add_labels(address, labels))
            assert stored == n, stored
            label_rate = n / seconds
            print(
                f"AddLabels                      {label_rate:>10,.0f} rows/s  ratio vs raw COPY {label_rate / copy_floor:.2f}"
            )

            # (d) training data.
            asyncio.run(vacuum(url))
            select_rates, stream_rates = [], []
            chunks = 0
            for _ in range(args.repeats):
                got, seconds = asyncio.run(raw_select(url))
                assert got == n, got
                select_rates.append(n / seconds)
                got, seconds, chunks = asyncio.run(training_data(address))
                assert got == n, got
                stream_rates.append(n / seconds)
            select_floor, stream_rate = max(select_rates), max(stream_rates)
            print(f"raw SELECT of the rows (floor) {select_floor:>10,.0f} rows/s")
            print(
                f"GetTrainingData                {stream_rate:>10,.0f} rows/s  ({chunks} chunks; target >= 100,000 rows/s)"
            )

            figures_rows = [
                ("log_predictions_throughput", store_rate, copy_floor),
                ("add_labels_throughput", label_rate, copy_floor),
                ("get_training_data_throughput", stream_rate, select_floor),
            ]
            for name, value, floor in figures_rows:
                figures.add(name, value, "rows/s", floor, True)

            # (e) Predict with logging off vs on.
            model, x = bench_regressor()
            repo = Path(tmp) / "models"
            import_pipeline(model, "rf", repo)
            payload = predict_payload(x[0].astype(np.float32))
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(2):
                for mode in ("off", "on"):
                    port = free_port()
                    extra = (
                        ["--store", address, "--spool-dir", str(Path(tmp) / f"spool-{port}")]
                        if mode == "on"
                        else []
                    )
                    server = start_process(
                        [
                            PYTHON,
                            "-m",
                            "cyclone",
                            "serve",
                            "inference",
                            "--model-repository",
                            str(repo),
                            "--model",
                            "rf",
                            "--port",
                            str(port),
                            "--metrics-port",
                            "-1",
                            *extra,
                        ],
                        port,
                    )
                    try:
                        rate, _, _ = asyncio.run(
                            unary_load(f"127.0.0.1:{port}", PREDICT, payload, 8, args.seconds)
                        )
                    finally:
                        stop_process(server)
                    rates[mode].append(rate)
            off, on = max(rates["off"]), max(rates["on"])
            logged = asyncio.run(count(url, "predictions", "rf"))
            print(
                f"Predict c8 logging off         {off:>10,.0f} req/s  runs {[round(r) for r in rates['off']]}"
            )
            print(
                f"Predict c8 logging on          {on:>10,.0f} req/s  runs {[round(r) for r in rates['on']]}"
                f"  ratio {on / off:.2f} (target >= 0.9); {logged:,} predictions logged"
            )
            figures.add("predict_c8_logging_on_throughput", on, "req/s", off, True)
        finally:
            stop_process(store)
    figures.emit()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
