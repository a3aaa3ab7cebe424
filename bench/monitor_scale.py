"""Monitor at scale: 10, 100, 1,000 models with ~1,000-row windows on a schedule.

For each size the models are registered (copies of the credit example, with its reference
profile and baseline, all serving), their windows filled straight into PostgreSQL, and a
`Monitor` runs its real schedule in this process (pinned to one core) against a store server
subprocess for a first round (every model due at once, as after a restart) and then a steady
stretch. Reported per size: evaluation lag (start minus due time) of the steady stretch, the
first round's length, and this process's CPU per evaluation; floor: CPU of the bare window read
(`Monitor.read_window`, one GetTrainingData stream) of the same models, measured in the same run.

Time is compressed by default: a 20 s schedule puts 3x the load of a 1-minute one on the monitor
and its store (`--every 60` for the real thing: ~6 minutes at 1,000 models). Target: 1,000
models every minute on one core, lag < 10 s. The sizes share one database, grown in turn.

Each size runs once per tick listing in `--listings` (default both, for ratios in one run):
"summary" is the monitor's (identities each tick, full records of new versions only), "full"
the monitor before issue 22 (every version's full record every tick); each row also reports the
tick's listing size in bytes and its round trip.

Usage: python -m bench.monitor_scale [--sizes 10,100,1000] [--every 20] [--rows 1000]
       [--concurrency 8] [--listings full,summary]
`bench/scale.py` can call `run(sizes, every, rows, concurrency)`: it prints the table and
returns the `Figures` (`.emit()` prints them as JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import yaml
from grpc import aio

from bench._common import Figures, percentile, stop_process
from bench._store_process import scratch_database, start_store_process
from cyclone.plan import default_plan, plan_to_dict
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor.convert import model_info_from_store
from services.monitor.monitor import DEFAULT_CONCURRENT_EVALUATIONS, Monitor
from services.monitor.records import ModelInfo
from services.store.db import PredictionRecord, StoreDB, uuid7, uuid7_time

CITIES = ("lisbon", "porto", "braga", "faro")


@dataclass(frozen=True)
class SizeResult:
    models: int
    listing: str  # "summary" (the monitor's tick) or "full" (before: every record, every tick)
    tick_bytes: int  # the tick's ListModelVersions answer, serialized
    tick_listing_ms: float  # its round trip, median of a few
    every_seconds: int
    evaluations: int  # in the steady stretch
    asked_per_s: float  # evaluations per second the schedule asks for: models / every
    done_per_s: float  # evaluations per second done in the steady stretch
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float
    overdue_max_s: float  # sampled twice a second: the most overdue model not yet started
    first_round_s: float  # every model due at once: how long until all were evaluated
    cpu_per_evaluation_ms: float
    cpu_per_window_read_ms: float  # the floor
    store_cpu_per_evaluation_ms: float
    cores_used: float  # this process's CPU seconds per wall second in the steady stretch


# --- models and windows ------------------------------------------------------------------------


def credit_entry() -> store_pb.ModelVersion:
    """The credit example's registry entry (schema, reference profile, baseline)."""
    from cyclone.models.convert import import_pipeline
    from cyclone.models.registration import registry_entry
    from cyclone.models.repository import ModelRepository
    from cyclone_app.examples import credit_frame, credit_pipeline

    with tempfile.TemporaryDirectory(prefix="cyclone-bench-monitor-") as root:
        sample = credit_frame(2000, seed=0)
        import_pipeline(
            credit_pipeline(sample), "credit", Path(root), sample=sample, label_column="defaulted"
        )
        return registry_entry(ModelRepository(Path(root)).files("credit"))


def model_names(start: int, stop: int) -> list[str]:
    return [f"m{i:04d}" for i in range(start, stop)]


async def register_models(
    store: store_grpc.StoreServiceStub,
    entry: store_pb.ModelVersion,
    names: Sequence[str],
    every_seconds: int | None = None,
) -> None:
    """Register `entry` under every name, serving; with `every_seconds`, the default plan on
    that schedule is stored as its plan."""

    async def one(name: str) -> None:
        mv = store_pb.ModelVersion()
        mv.CopyFrom(entry)
        mv.model, mv.version = name, "1"
        await store.RegisterModelVersion(
            store_pb.RegisterModelVersionRequest(model_version=mv), timeout=30
        )
        await store.SetModelStatus(
            store_pb.SetModelStatusRequest(
                model=name, version="1", status=store_pb.MODEL_STATUS_SERVING
            ),
            timeout=30,
        )
        if every_seconds:
            plan_yaml = scheduled_plan(name, every_seconds)
            await store.SavePlan(
                store_pb.SavePlanRequest(model=name, plan_yaml=plan_yaml), timeout=30
            )

    for i in range(0, len(names), 50):
        await asyncio.gather(*(one(n) for n in names[i : i + 50]))


@functools.cache
def _traffic(rows: int, seed: int) -> list[tuple[str, str, str]]:
    """(input JSON, output JSON, label JSON) of `rows` credit applicants like the reference's,
    predicted right about three times in four."""
    from cyclone_app.examples import credit_frame

    rng = random.Random(seed)
    frame = credit_frame(rows, seed=seed)
    out = []
    for row in frame.to_dict("records"):
        truth = str(int(row.pop("defaulted")))
        predicted = truth if rng.random() < 0.75 else str(1 - int(truth))
        p1 = rng.uniform(0.5, 1.0) if predicted == "1" else rng.uniform(0.0, 0.5)
        output = {"label": predicted, "probabilities": {"0": 1 - p1, "1": p1}}
        out.append((json.dumps(row), json.dumps(output), json.dumps(truth)))
    return out


async def fill_windows(url: str, names: Sequence[str], rows: int) -> None:
    """`rows` predictions per model over the last half hour, half of them labelled, written
    straight to PostgreSQL in large batches."""
    db = StoreDB()
    await db.open(url)
    try:
        end = datetime.now(UTC)
        batch: list[PredictionRecord] = []
        labels: list[tuple[uuid.UUID, str]] = []
        for k, name in enumerate(names):
            for i, (inp, out, label) in enumerate(_traffic(rows, k % 8)):
                pid = uuid7(end - timedelta(seconds=1800 * (rows - i) / rows))
                batch.append(PredictionRecord(pid, uuid7_time(pid), name, "1", inp, out, 1.5, None))
                if i % 2 == 0:
                    labels.append((pid, label))
            if len(batch) >= 50_000 or k == len(names) - 1:
                await db.copy_predictions(batch)
                await db.add_labels(labels)
                batch, labels = [], []
    finally:
        await db.close()


def scheduled_plan(name: str, every_seconds: int) -> str:
    """The default classification plan on an `every_seconds` schedule."""
    plan = plan_to_dict(default_plan(name, "classification"))
    plan["schedule"] = {"every": f"{every_seconds}s"}
    return yaml.safe_dump(plan)


# --- measuring ---------------------------------------------------------------------------------


def pin_to_one_core() -> None:
    """Every thread of this process on one core (the store and PostgreSQL run elsewhere)."""
    core = min(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {core})


class FullListingMonitor(Monitor):
    """The monitor as it was before issue 22's lighter listing: every tick lists every version
    with its schema, evaluation and reference profile. Here only to compare in the same run."""

    async def _monitored_models(self) -> dict[str, ModelInfo]:
        response = await self.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(), timeout=self.request_timeout
        )
        listed: dict[str, ModelInfo] = {}
        for mv in response.model_versions:
            if mv.status != store_pb.MODEL_STATUS_SERVING:
                continue
            key = (mv.model, mv.version, mv.sha256)
            info = self._infos.get(key)
            if info is None:
                info = self._infos[key] = model_info_from_store(mv)
            listed[mv.model] = info
        return listed


LISTINGS: dict[str, tuple[type[Monitor], store_pb.ListModelVersionsRequest]] = {
    "full": (FullListingMonitor, store_pb.ListModelVersionsRequest()),
    "summary": (
        Monitor,
        store_pb.ListModelVersionsRequest(status=store_pb.MODEL_STATUS_SERVING, summary=True),
    ),
}


async def tick_listing(
    address: str, request: store_pb.ListModelVersionsRequest
) -> tuple[int, float]:
    """(bytes, median ms) of the tick's listing, five calls."""
    times, size = [], 0
    async with aio.insecure_channel(
        address, options=(("grpc.max_receive_message_length", 256 * 1024 * 1024),)
    ) as channel:
        store = store_grpc.StoreServiceStub(channel)
        for _ in range(5):
            t0 = time.perf_counter()
            response = await store.ListModelVersions(request, timeout=60)
            times.append(time.perf_counter() - t0)
            size = response.ByteSize()
    return size, statistics.median(times) * 1000


@contextlib.asynccontextmanager
async def scheduled(monitor: Monitor) -> AsyncIterator[list[tuple[str, float]]]:
    """The monitor's schedule running; yields (model, wall time) of each evaluation."""
    seen: list[tuple[str, float]] = []

    async def watch() -> None:
        async for status in monitor.watch(""):
            seen.append((status.model, time.monotonic()))

    watcher = asyncio.create_task(watch())
    await monitor.start(schedule=True)
    try:
        yield seen
    finally:
        await monitor.stop()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def window_read_cpu(monitor: Monitor, names: Sequence[str]) -> float:
    """CPU seconds of this process per bare window read (the floor), sequential reads."""
    infos = await monitor._monitored_models()
    plan = default_plan("x", "classification")
    cpu = time.process_time()
    for name in names:
        window = await monitor.read_window(infos[name], plan)
        assert len(window.predictions) > 0, name
    return (time.process_time() - cpu) / len(names)


async def measure(
    address: str,
    store_pid: int,
    n: int,
    every: int,
    tmp: Path,
    concurrency: int,
    listing: str = "summary",
) -> SizeResult:
    monitor_class, tick_request = LISTINGS[listing]
    tick_bytes, tick_ms = await tick_listing(address, tick_request)
    monitor = monitor_class(
        address,
        record_path=tmp / "alerts.jsonl",
        tick_seconds=1.0,
        max_concurrent_evaluations=concurrency,
    )
    store_proc = psutil.Process(store_pid)
    async with scheduled(monitor) as seen:
        started = time.monotonic()
        while len({m for m, _ in seen}) < n:  # the first round: every model due at once
            if time.monotonic() - started > 300:
                raise RuntimeError(f"the first round of {n} models took over 300 s")
            await asyncio.sleep(0.1)
        first_round = time.monotonic() - started
        # Half a period on: models still in step with the first round (a few) fall due in the
        # middle of the stretch, not on its edges.
        await asyncio.sleep(every / 2)
        monitor.lags.clear()
        # The steady stretch: three whole periods after the first round.
        stretch = 3 * every
        cpu, store_cpu = time.process_time(), store_proc.cpu_times()
        t0, before = time.monotonic(), len(seen)
        overdue = 0.0
        while time.monotonic() - t0 < stretch:
            await asyncio.sleep(0.5)
            overdue = max(overdue, monitor.overdue_seconds())
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu
        after = store_proc.cpu_times()
        store_used = (after.user - store_cpu.user) + (after.system - store_cpu.system)
        evaluations = len(seen) - before
        lags = list(monitor.lags)
    floor_monitor = Monitor(address, record_path=tmp / "alerts.jsonl")
    await floor_monitor.start(schedule=False)
    try:
        floor = await window_read_cpu(floor_monitor, model_names(0, min(n, 100)))
    finally:
        await floor_monitor.stop()
    per_eval = cpu / max(evaluations, 1)
    return SizeResult(
        models=n,
        listing=listing,
        tick_bytes=tick_bytes,
        tick_listing_ms=tick_ms,
        every_seconds=every,
        evaluations=evaluations,
        asked_per_s=n / every,
        done_per_s=evaluations / wall,
        lag_p50_s=statistics.median(lags) if lags else float("nan"),
        lag_p99_s=percentile(lags, 0.99),
        lag_max_s=max(lags, default=float("nan")),
        overdue_max_s=overdue,
        first_round_s=first_round,
        cpu_per_evaluation_ms=per_eval * 1000,
        cpu_per_window_read_ms=floor * 1000,
        store_cpu_per_evaluation_ms=store_used / max(evaluations, 1) * 1000,
        cores_used=cpu / wall,
    )


async def run_sizes(
    url: str,
    address: str,
    store_pid: int,
    sizes: Sequence[int],
    every: int,
    rows: int,
    concurrency: int,
    listings: Sequence[str] = ("summary",),
) -> list[SizeResult]:
    entry = credit_entry()
    results = []
    registered = 0
    async with aio.insecure_channel(address) as channel:
        store = store_grpc.StoreServiceStub(channel)
        for n in sorted(sizes):
            names = model_names(registered, n)
            t0 = time.monotonic()
            await register_models(store, entry, names, every)
            await fill_windows(url, names, rows)
            registered = n
            print(
                f"[{n} models] registered and filled in {time.monotonic() - t0:.1f} s", flush=True
            )
            for listing in listings:
                with tempfile.TemporaryDirectory(prefix="cyclone-bench-monitor-") as tmp:
                    result = await measure(
                        address, store_pid, n, every, Path(tmp), concurrency, listing
                    )
                print(f"[{n} models] {json.dumps(asdict(result))}", flush=True)
                results.append(result)
    return results


def run(
    sizes: Sequence[int] = (10, 100, 1000),
    every: int = 20,
    rows: int = 1000,
    concurrency: int = DEFAULT_CONCURRENT_EVALUATIONS,
    listings: Sequence[str] = ("summary",),
) -> Figures:
    """The MONITOR section of the scale benchmark: a table and its figures."""
    with scratch_database() as url:
        store, address = start_store_process(url)
        try:
            pin_to_one_core()
            # Level changes are logged as warnings: a thousand of them would drown the table.
            logging.getLogger("services.monitor").setLevel(logging.ERROR)
            results = asyncio.run(
                run_sizes(url, address, store.pid, sizes, every, rows, concurrency, listings)
            )
        finally:
            stop_process(store)
    print(f"\nMONITOR: ~{rows}-row windows, default classification plan, every {every} s,")
    print(f"{concurrency} evaluations at once, this process on one core")
    header = (
        f"{'models':>7} {'listing':>8} {'tick KB':>8} {'list ms':>8} {'asked/s':>7} {'done/s':>7} {'lag p50':>8} {'p99':>7} {'max':>7}"
        f" {'overdue':>7} {'1st round':>9} {'cpu/eval':>9} {'read':>7} {'store/eval':>10}"
        f" {'cores':>6}"
    )
    print(header)
    for r in results:
        print(
            f"{r.models:>7} {r.listing:>8} {r.tick_bytes / 1024:>8.1f} {r.tick_listing_ms:>8.1f}"
            f" {r.asked_per_s:>7.1f} {r.done_per_s:>7.1f} {r.lag_p50_s:>7.2f}s"
            f" {r.lag_p99_s:>6.2f}s {r.lag_max_s:>6.2f}s {r.overdue_max_s:>6.2f}s"
            f" {r.first_round_s:>8.1f}s"
            f" {r.cpu_per_evaluation_ms:>7.1f}ms {r.cpu_per_window_read_ms:>5.1f}ms"
            f" {r.store_cpu_per_evaluation_ms:>8.1f}ms {r.cores_used:>6.2f}"
        )
    print_ratios(results)
    figures = Figures()
    for r in results:
        if r.listing != "summary":
            continue  # the "before" rows are for the ratios only
        # Higher is better for both: the read floor over our CPU; evaluations done over asked.
        figures.add(
            f"monitor_{r.models}_cpu_per_evaluation_ms",
            r.cpu_per_evaluation_ms,
            "ms",
            r.cpu_per_window_read_ms,
            False,
        )
        figures.add(
            f"monitor_{r.models}_evaluations_per_s", r.done_per_s, "1/s", r.asked_per_s, True
        )
        figures.add(f"monitor_{r.models}_lag_p99_s", r.lag_p99_s, "s", 10.0, False)
    return figures


def print_ratios(results: Sequence[SizeResult]) -> None:
    """Full listing (before) over summary listing (after), per size, same run."""
    by = {(r.models, r.listing): r for r in results}
    pairs = [
        (by[(n, "full")], by[(n, "summary")])
        for n, kind in by
        if kind == "full" and (n, "summary") in by
    ]
    if not pairs:
        return
    print("\nfull listing / summary listing (before / after), same run:")
    print(
        f"{'models':>7} {'tick bytes':>10} {'list ms':>8} {'lag p99':>8} {'cpu/eval':>9} {'store/eval':>10}"
    )
    for full, light in pairs:
        print(
            f"{full.models:>7} {full.tick_bytes / max(light.tick_bytes, 1):>9.0f}x"
            f" {full.tick_listing_ms / light.tick_listing_ms:>7.1f}x"
            f" {full.lag_p99_s / max(light.lag_p99_s, 1e-3):>7.1f}x"
            f" {full.cpu_per_evaluation_ms / light.cpu_per_evaluation_ms:>8.2f}x"
            f" {full.store_cpu_per_evaluation_ms / light.store_cpu_per_evaluation_ms:>9.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--every", type=int, default=20, help="schedule, seconds (60: the target)")
    ap.add_argument("--rows", type=int, default=1000, help="rows per window")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENT_EVALUATIONS)
    ap.add_argument(
        "--listings",
        default="full,summary",
        help="the tick's listing: summary (now), full (before issue 22), or both to compare",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    listings = [x for x in args.listings.split(",") if x]
    unknown = [x for x in listings if x not in LISTINGS]
    if unknown:
        ap.error(f"--listings: unknown {unknown}; choose from {sorted(LISTINGS)}")
    run(sizes, args.every, args.rows, args.concurrency, listings).emit()


if __name__ == "__main__":
    main()
