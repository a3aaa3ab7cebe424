"""Store DB speed check: raw binary COPY vs copy_predictions, and training_data streaming.

python bench/store_db.py [--rows 100000]   (uses $CYCLONE_DATABASE_URL or a temp embedded PG)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta

import psycopg

from services.store.db import PredictionRecord, StoreDB, uuid7, uuid7_time
from services.store.db.ingest import prepare_copy_cursor
from services.store.db.queries import COPY_COLUMNS, COPY_TYPES
from services.store.embedded import start_embedded


def make_rows(n: int, start: datetime) -> list[PredictionRecord]:
    rows = []
    for i in range(n):
        pid = uuid7(start + timedelta(milliseconds=i))
        inp = json.dumps({"f0": i * 0.5, "f1": i % 7, "f2": "abc", "f3": 1.25, "f4": i % 3})
        out = json.dumps({"label": "yes", "probabilities": {"yes": 0.75, "no": 0.25}})
        rows.append(PredictionRecord(pid, uuid7_time(pid), "bench", "1", inp, out, 1.5, None))
    return rows


async def raw_copy(url: str, rows: list[PredictionRecord]) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        async with conn.transaction(), conn.cursor() as cur:
            prepare_copy_cursor(cur)
            q = f"COPY predictions ({COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            async with cur.copy(q.encode()) as copy:
                copy.set_types(COPY_TYPES)
                for r in rows:
                    await copy.write_row(r)
        return time.perf_counter() - t0


async def truncate(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE predictions, labels")
        await conn.execute("VACUUM ANALYZE predictions")


async def main(url: str, n: int, batch: int) -> None:
    db = StoreDB()
    await db.open(url)
    start = datetime.now(UTC) - timedelta(hours=1)
    rows = make_rows(n, start)
    results: dict[str, list[float]] = {"raw": [], "store": []}
    for _ in range(3):
        await truncate(url)
        results["raw"].append(n / await raw_copy(url, rows))
        await truncate(url)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            await db.copy_predictions(rows[i : i + batch])
        results["store"].append(n / (time.perf_counter() - t0))
    raw, store = max(results["raw"]), max(results["store"])
    print(f"raw binary COPY      {raw:>10,.0f} rows/s")
    print(f"copy_predictions     {store:>10,.0f} rows/s  ({store / raw:.2f}x raw, batch={batch})")

    t0 = time.perf_counter()
    for i in range(0, n, 10_000):
        await db.add_labels([(r.prediction_id, '"yes"') for r in rows[i : i + 10_000]])
    print(f"add_labels           {n / (time.perf_counter() - t0):>10,.0f} rows/s")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE predictions")
        await conn.execute("VACUUM ANALYZE labels")
    for decode in (False, True):
        t0 = time.perf_counter()
        got = 0
        async for chunk in db.training_data("bench", start, start + timedelta(days=1)):
            got += len(chunk)
            if decode:
                chunk.inputs()
                chunk.labels()
        dt = time.perf_counter() - t0
        label = "training_data+decode" if decode else "training_data"
        print(f"{label:<20} {got / dt:>10,.0f} rows/s ({got} rows)")
    await db.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5_000)
    args = ap.parse_args()
    url = os.environ.get("CYCLONE_DATABASE_URL")
    if url:
        asyncio.run(main(url, args.rows, args.batch))
    else:
        with tempfile.TemporaryDirectory() as d, start_embedded(d) as pg:
            asyncio.run(main(pg.url, args.rows, args.batch))
