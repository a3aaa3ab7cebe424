"""A store that stays fast as it grows: retention, the per-minute rollup, pruned label joins.

Real (embedded) PostgreSQL in plain-partitioned mode, small tables.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cyclone.settings import SettingsError, load_settings
from services.store.db import PredictionRecord, StoreDB, queries, uuid7, uuid7_time
from services.store.db.partitions import ensure_partitions
from services.store.db.reads import STATS_SNAPSHOT, stats_params
from services.store.domain import Store
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration


def rec(
    at: datetime, model: str = "m", version: str = "1", latency: float = 1.0, value: float = 0.0
) -> PredictionRecord:
    pid = uuid7(at)
    return PredictionRecord(
        pid, uuid7_time(pid), model, version, '{"x": 1}', json.dumps({"value": value}), latency
    )


@pytest.fixture
async def db(fresh_database_url: str) -> AsyncIterator[StoreDB]:
    store = StoreDB(min_size=1, max_size=4, retain_for=timedelta(days=3))
    await store.open(fresh_database_url)
    yield store
    await store.close()


async def _figures(db: StoreDB, model: str | None = None, *, raw: bool = False) -> list[object]:
    """GetStats' figures except the lag, which moves with the clock."""
    stats = await db.stats(model, raw=raw)
    return [
        (s.model, s.predictions, s.labels, s.label_coverage, s.last_prediction_at) for s in stats
    ]


async def _count(db: StoreDB, sql: str) -> int:
    async with db.pool.connection() as c:
        row = await (await c.execute(sql)).fetchone()
    assert row is not None
    return int(row[0])


# --- retention ----------------------------------------------------------------------------------


async def test_rows_past_retention_are_gone_and_recent_labels_still_join(db: StoreDB) -> None:
    now = datetime.now(UTC)
    old, older, recent = now - timedelta(days=5), now - timedelta(days=10), now - timedelta(hours=1)
    async with db.pool.connection() as c:
        await ensure_partitions(c, 0, today=old.date())  # a partition for the old day
    rows = [rec(old), rec(old), rec(older), rec(recent), rec(recent)]  # `older`: DEFAULT
    await db.copy_predictions(rows)
    labels = [(r.prediction_id, "1.0") for r in rows]
    assert (await db.add_labels(labels)).stored == 5
    await db.refresh_rollup()

    result = await db.apply_retention()

    assert result.cutoff is not None and result.cutoff <= now - timedelta(days=3)
    assert f"predictions_p{old:%Y%m%d}" in result.dropped_partitions
    assert result.deleted_labels == 3
    assert await _count(db, "SELECT count(*) FROM predictions") == 2
    assert await _count(db, "SELECT count(*) FROM labels") == 2
    assert (
        await _count(
            db, "SELECT count(*) FROM prediction_rollup_1m WHERE bucket < now() - interval '2 days'"
        )
        == 0
    )
    # Recent rows keep their labels and join as before.
    for r in rows[3:]:
        got = await db.get_prediction(r.prediction_id)
        assert got is not None and got.label == 1.0
    [stats] = await db.stats("m")
    assert (stats.predictions, stats.labels) == (2, 2)
    assert await _figures(db, "m") == await _figures(db, "m", raw=True)
    assert (await db.apply_retention()).dropped_partitions == []  # idempotent


async def test_label_for_a_dropped_prediction_is_ignored_with_an_answer(db: StoreDB) -> None:
    from services.store.db import ModelVersion

    await db.register_model_version(ModelVersion("m", "1", task="regression"))
    now = datetime.now(UTC)
    gone, kept = rec(now - timedelta(days=4)), rec(now - timedelta(minutes=5))
    await db.copy_predictions([kept])
    store = Store(db)

    result = await store.add_labels(
        "m", [(str(gone.prediction_id), 2.0), (str(kept.prediction_id), 3.0)]
    )

    assert result.stored == 1
    assert result.expired == [gone.prediction_id]
    assert result.unmatched == []
    assert await _count(db, "SELECT count(*) FROM labels") == 1


async def test_predictions_past_retention_are_counted_expired_not_stored(db: StoreDB) -> None:
    """As labels of such predictions are: a batch (a spool replayed after a long outage) mixing
    old and fresh records stores the fresh ones and names how many were past retention."""
    from cyclone.store.v1 import store_service_pb2 as store_pb

    now = datetime.now(UTC)
    old, fresh = rec(now - timedelta(days=4)), rec(now - timedelta(minutes=5))
    wire = [
        store_pb.PredictionRecord(
            prediction_id=str(r.prediction_id),
            model="m",
            version="1",
            input_json=b'{"x": 1}',
            output_json=b'{"value": 0.0}',
            latency_ms=1.0,
        )
        for r in (old, fresh)
    ]

    async def batches() -> AsyncIterator[list[store_pb.PredictionRecord]]:
        yield wire
        yield wire[:1]  # a batch holding nothing but expired records

    logged = await Store(db).log_predictions(batches())

    assert (logged.received, logged.inserted, logged.expired) == (3, 1, 2)
    assert await db.get_prediction(old.prediction_id) is None
    assert await db.get_prediction(fresh.prediction_id) is not None


async def test_keep_forever_drops_nothing(fresh_database_url: str) -> None:
    store = StoreDB(min_size=1, max_size=2, retain_for=None)
    await store.open(fresh_database_url)
    try:
        await store.copy_predictions([rec(datetime.now(UTC) - timedelta(days=900))])
        result = await store.apply_retention()
        assert result.cutoff is None and store.retention_cutoff() is None
        assert await _count(store, "SELECT count(*) FROM predictions") == 1
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"CYCLONE_RETENTION_DAYS": "-1"}, "retention_days"),
        ({"CYCLONE_RETENTION_DAYS": "a month"}, "retention_days"),
        ({"CYCLONE_COMPRESS_AFTER_DAYS": "0"}, "compress_after_days"),
        ({"CYCLONE_ROLLUP_REFRESH_SECONDS": "0"}, "rollup_refresh_seconds"),
    ],
)
def test_bad_retention_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        load_settings(StoreSettings, env=env)


def test_retention_settings_default_and_forever() -> None:
    assert load_settings(StoreSettings, env={}).retain_for == timedelta(days=30)
    assert load_settings(StoreSettings, env={"CYCLONE_RETENTION_DAYS": "0"}).retain_for is None
    flags = {"retention_days": 7}
    assert load_settings(StoreSettings, flags, env={}).retain_for == timedelta(days=7)


# --- the per-minute rollup ----------------------------------------------------------------------


async def _raw_minutes(
    db: StoreDB, model: str, start: datetime, end: datetime
) -> list[tuple[object, ...]]:
    async with db.pool.connection() as c:
        cur = await c.execute(
            "SELECT * FROM prediction_stats_1m_raw(%s, %s, %s) ORDER BY 3, 2", (model, start, end)
        )
        return list(await cur.fetchall())


async def _minutes(
    db: StoreDB, model: str, start: datetime, end: datetime
) -> list[tuple[object, ...]]:
    async with db.pool.connection() as c:
        cur = await c.execute(
            queries.PREDICTION_STATS, {"model": model, "start": start, "end": end}
        )
        return list(await cur.fetchall())


def _rounded(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    # Means may differ in the last bit: the rollup sums the rows in another order.
    return [tuple(float(f"{v:.12g}") if isinstance(v, float) else v for v in r) for r in rows]


async def _assert_same_as_raw(db: StoreDB, t0: datetime) -> None:
    assert await _figures(db) == await _figures(db, raw=True)
    windows = [
        (t0, t0 + timedelta(minutes=30)),  # whole minutes
        (t0 + timedelta(seconds=17), t0 + timedelta(minutes=9, seconds=41)),  # partial edges
        (t0 + timedelta(seconds=5), t0 + timedelta(seconds=50)),  # inside one minute
        (t0 - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)),  # up to now
    ]
    for model in ("a", "b"):
        for start, end in windows:
            got = await _minutes(db, model, start, end)
            want = await _raw_minutes(db, model, start, end)
            assert _rounded(got) == _rounded(want)


async def test_rollup_equals_raw_computation_through_late_rows_and_labels(db: StoreDB) -> None:
    rng = random.Random(7)
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=20)

    def batch(n: int, lo: float, hi: float) -> list[PredictionRecord]:
        return [
            rec(
                t0 + timedelta(seconds=rng.uniform(lo, hi)),
                model=rng.choice("ab"),
                version=rng.choice("12"),
                latency=round(rng.uniform(0.5, 9.0), 2),
                value=rng.uniform(-1, 1),
            )
            for _ in range(n)
        ]

    first = batch(400, 0, 600)
    await db.copy_predictions(first)
    await db.add_labels([(r.prediction_id, "1") for r in first[::3]])
    refreshed = await db.refresh_rollup()
    assert refreshed.minutes >= 10
    assert await _count(db, "SELECT count(*) FROM prediction_rollup_1m") >= 20
    await _assert_same_as_raw(db, t0)

    # Late rows into minutes already materialized, new labels for old minutes, and rows after
    # the watermark (read raw until the next refresh).
    late = batch(50, 60, 300)
    await db.copy_predictions(late)
    await db.add_labels([(r.prediction_id, "2") for r in first[1::3] + late[::2]])
    await db.copy_predictions(batch(30, 1190, 1200))
    # Before the refresh, the stale minutes are read from raw rows: still the same answers.
    pending = await _count(db, "SELECT count(*) FROM rollup_pending_minutes()")
    assert pending >= 4
    assert await _count(db, "SELECT count(*) FROM rollup_label_delta") >= 5
    await _assert_same_as_raw(db, t0)
    refreshed = await db.refresh_rollup()
    assert refreshed.minutes >= 4 and refreshed.relabelled >= 1
    assert await _count(db, "SELECT count(*) FROM rollup_pending_minutes()") == 0
    # Grafana's label coverage reads the rollup too, and agrees with raw rows once refreshed.
    async with db.pool.connection() as c:
        window = ("a", t0, datetime.now(UTC) + timedelta(minutes=1))
        cur = await c.execute("SELECT * FROM label_coverage_1m_range(%s, %s, %s)", window)
        coverage = await cur.fetchall()
        cur = await c.execute(
            "SELECT date_bin('1 minute', p.created_at, timestamptz '2000-01-01'), count(*),"
            " count(l.prediction_id) FROM predictions p LEFT JOIN labels l USING (prediction_id)"
            " WHERE p.model = %s AND p.created_at >= %s AND p.created_at < %s GROUP BY 1 ORDER BY 1",
            window,
        )
        assert coverage == await cur.fetchall()
    await _assert_same_as_raw(db, t0)
    assert await _count(db, "SELECT count(*) FROM rollup_label_delta") == 0


async def test_status_reads_the_rollup_not_raw_rows(db: StoreDB) -> None:
    t0 = datetime.now(UTC) - timedelta(hours=2)
    await db.copy_predictions([rec(t0 + timedelta(seconds=i)) for i in range(120)])
    await db.refresh_rollup()
    # Rows the rollup does not know about (no dirty range) stay invisible to the stats: proof
    # that materialized minutes are not recounted from raw rows.
    async with db.pool.connection() as c:
        await c.execute(
            "INSERT INTO predictions (prediction_id, created_at, model, version, input, output)"
            " VALUES (%s, %s, 'm', '1', '{}', '{}')",
            (uuid7(t0), uuid7_time(uuid7(t0))),
        )
    [stats] = await db.stats("m")
    assert stats.predictions == 120
    [raw] = await db.stats("m", raw=True)
    assert raw.predictions == 121


# --- label joins prune to one partition ---------------------------------------------------------


async def _plan(db: StoreDB, sql: str, params: dict[str, object]) -> str:
    async with db.pool.connection() as c:
        cur = await c.execute(
            ("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + sql).encode(), params
        )
        return "\n".join(str(r[0]) for r in await cur.fetchall())


async def test_lookups_by_prediction_id_touch_one_partition(db: StoreDB) -> None:
    now = datetime.now(UTC)
    rows = [rec(now - timedelta(days=d, minutes=1)) for d in (0, 1)] + [
        rec(now + timedelta(days=d)) for d in (1, 2, 3)
    ]
    await db.copy_predictions(rows)
    pid = rows[1].prediction_id
    get_plan = await _plan(db, queries.GET_PREDICTION, {"id": pid})
    scanned = {
        line.split(" on ")[1].split()[0]
        for line in get_plan.splitlines()
        if " on predictions_" in line
    }
    assert scanned == {f"predictions_p{uuid7_time(pid):%Y%m%d}"}, get_plan
    label_plan = await _plan(
        db, queries.UPSERT_LABELS, {"ids": [pid], "labels": ["1"], "model": None}
    )
    # Runtime pruning: of the partitions, only the id's own day is ever scanned.
    executed = [
        line
        for line in label_plan.splitlines()
        if " on predictions_" in line and "never executed" not in line
    ]
    assert len(executed) == 1 and f"predictions_p{uuid7_time(pid):%Y%m%d}" in executed[0], (
        label_plan
    )


# --- the dashboard and status plan only the partitions they read -------------------------------


def _partitions_in(plan: str) -> set[str]:
    return {
        line.split(" on ")[1].split()[0]
        for line in plan.splitlines()
        if " on predictions_p" in line
    }


async def test_dashboard_and_status_plan_only_their_window_s_partitions(db: StoreDB) -> None:
    """Ten days stored: the newest hour's per-minute stats and the status plan no older day.

    0009's raw-row parts took their bounds from rollup_state at run time and so planned every
    day stored (the dashboard's cost grew with the table); 0012 and the status query's
    pending bounds give the planner the window.
    """
    now = datetime.now(UTC)
    async with db.pool.connection() as c:
        await ensure_partitions(c, 12, today=(now - timedelta(days=10)).date())
    old_days = [now - timedelta(days=d) for d in range(2, 10)]
    await db.copy_predictions([rec(t) for t in old_days] + [rec(now - timedelta(minutes=5))])
    await db.refresh_rollup()
    old_partitions = {f"predictions_p{t:%Y%m%d}" for t in old_days}

    hour = {"model": "m", "start": now - timedelta(hours=1), "end": now}
    dashboard = _partitions_in(await _plan(db, queries.PREDICTION_STATS, hour))
    assert dashboard and len(dashboard) <= 2 and not dashboard & old_partitions, dashboard

    async with db.pool.connection() as c:
        row = await (await c.execute(queries.MATERIALIZED_TO)).fetchone()
    assert row is not None and row[2] == []
    status = _partitions_in(await _plan(db, queries.STATS, stats_params(None, row[0], row[2])))
    assert not status & old_partitions, status

    # A late row five days back: only its day joins the status plan, and the answer is raw's.
    late = now - timedelta(days=5)
    await db.copy_predictions([rec(late)])
    async with db.pool.connection() as c:
        row = await (await c.execute(queries.MATERIALIZED_TO)).fetchone()
    assert row is not None and len(row[2]) == 1
    status = _partitions_in(await _plan(db, queries.STATS, stats_params(None, row[0], row[2])))
    assert status & old_partitions == {f"predictions_p{late:%Y%m%d}"}, status
    assert await _figures(db) == await _figures(db, raw=True)
    [stats] = await db.stats("m")
    assert stats.predictions == len(old_days) + 2


async def test_store_connections_run_without_jit(db: StoreDB) -> None:
    # JIT compiled the dashboard's whole-partition estimates for longer than it ran.
    async with db.pool.connection() as c:
        row = await (await c.execute("SHOW jit")).fetchone()
    assert row == ("off",)


# --- status reads running totals (0013), not every stored minute -------------------------------


async def _scan_figures(db: StoreDB, model: str | None = None) -> list[object]:
    """_figures through the status query before 0013: every rollup minute summed."""
    async with db.pool.connection() as c, c.transaction():
        await c.execute(STATS_SNAPSHOT)
        row = await (await c.execute(queries.MATERIALIZED_TO)).fetchone()
        assert row is not None
        params = stats_params(model, row[0], row[2])
        rows = await (await c.execute(queries.STATS_ROLLUP_SCAN, params)).fetchall()
    return [(m, n, lab, lab / n if n else 0.0, last) for m, n, lab, last in rows]


async def _totals_are_the_rollup_s_sums(db: StoreDB) -> None:
    async with db.pool.connection() as c:
        cur = await c.execute(
            "SELECT model, predictions, labels, last_at FROM prediction_rollup_total ORDER BY 1"
        )
        totals = await cur.fetchall()
        cur = await c.execute(
            "SELECT model, sum(predictions), sum(labels), max(last_at) FROM prediction_rollup_1m"
            " GROUP BY 1 ORDER BY 1"
        )
        assert totals == await cur.fetchall()


async def _assert_three_paths_agree(db: StoreDB, models: tuple[str, ...]) -> list[object]:
    """Totals, the old rollup scan and raw rows give the same figures, for all and per model."""
    await _totals_are_the_rollup_s_sums(db)
    figures = await _figures(db)
    assert figures == await _scan_figures(db) == await _figures(db, raw=True)
    for model in models:
        one = await _figures(db, model)
        assert one == await _scan_figures(db, model) == await _figures(db, model, raw=True)
    return figures


async def test_status_totals_answer_as_summing_the_rollup_and_raw_rows(db: StoreDB) -> None:
    """Same figures from the totals, the old full sum of the rollup and raw rows, through late
    labels, late rows into refreshed minutes, rows after a refresh and retention dropping days
    (retain_for is 3 days here), including a model whose every row is dropped."""
    rng = random.Random(22)
    now = datetime.now(UTC).replace(microsecond=0)
    async with db.pool.connection() as c:
        await ensure_partitions(c, 8, today=(now - timedelta(days=6)).date())

    def batch(n: int, days_ago: float, model: str | None = None) -> list[PredictionRecord]:
        return [
            rec(
                now - timedelta(days=days_ago, seconds=rng.uniform(0, 3600)),
                model=model or rng.choice(("a", "b")),
                version=rng.choice("12"),
                latency=round(rng.uniform(0.5, 9.0), 2),
            )
            for _ in range(n)
        ]

    old = batch(60, 5) + batch(20, 5, model="gone")  # past retention
    kept = batch(80, 2) + batch(80, 0.1)
    await db.copy_predictions(old + kept)
    await db.add_labels([(r.prediction_id, "1") for r in (old + kept)[::4]])
    assert (await db.refresh_rollup()).minutes > 0
    models = ("a", "b", "gone")
    first = await _assert_three_paths_agree(db, models)
    assert [f[0] for f in first] == ["a", "b", "gone"]  # type: ignore[index]

    # Labels arriving late for refreshed minutes: read as deltas, then folded.
    await db.add_labels([(r.prediction_id, "2") for r in (old + kept)[1::4]])
    await _assert_three_paths_agree(db, models)
    # Late rows into refreshed minutes (pending until the next refresh) and rows after it.
    await db.copy_predictions(batch(15, 2) + batch(10, 0.1))
    await db.copy_predictions(
        [rec(datetime.now(UTC) - timedelta(seconds=2), model="a") for _ in range(5)]
    )
    assert await _count(db, "SELECT count(*) FROM rollup_pending_minutes()") > 0
    await _assert_three_paths_agree(db, models)
    refreshed = await db.refresh_rollup()
    assert refreshed.minutes > 0 and refreshed.relabelled > 0
    await _assert_three_paths_agree(db, models)

    # Retention drops the 5-day-old partition: its minutes leave the totals, "gone" entirely.
    result = await db.apply_retention()
    assert f"predictions_p{old[0].created_at:%Y%m%d}" in result.dropped_partitions
    after = await _assert_three_paths_agree(db, models)
    assert [f[0] for f in after] == ["a", "b"]  # type: ignore[index]
    assert (
        await _count(db, "SELECT count(*) FROM prediction_rollup_total WHERE model = 'gone'") == 0
    )
    before_by_model = {f[0]: f[1] for f in first}  # type: ignore[index]
    after_by_model = {f[0]: f[1] for f in after}  # type: ignore[index]
    assert after_by_model["a"] < before_by_model["a"] + 30  # the old day's rows are gone

    # A refresh after retention (a pending range reaching into the dropped day) keeps agreeing.
    await db.copy_predictions(batch(5, 2))
    await db.refresh_rollup()
    await _assert_three_paths_agree(db, models)


async def test_status_reads_no_rollup_minute_when_none_is_stale(db: StoreDB) -> None:
    """Its cost does not grow with the minutes stored: no rollup row is read unless stale."""
    t0 = datetime.now(UTC) - timedelta(hours=20)
    await db.copy_predictions([rec(t0 + timedelta(minutes=i)) for i in range(600)])
    await db.refresh_rollup()
    assert await _count(db, "SELECT count(*) FROM prediction_rollup_1m") == 600

    async def rollup_rows_read() -> int:
        async with db.pool.connection() as c:
            row = await (await c.execute(queries.MATERIALIZED_TO)).fetchone()
            assert row is not None
            sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + queries.STATS
            cur = await c.execute(sql.encode(), stats_params(None, row[0], row[2]))
            plan = (await cur.fetchone())[0]  # type: ignore[index]

        def walk(node: dict[str, Any]) -> int:
            own = node["Actual Rows"] if node.get("Relation Name") == "prediction_rollup_1m" else 0
            return own + sum(walk(child) for child in node.get("Plans", []))

        return int(walk(plan[0]["Plan"]))

    assert await rollup_rows_read() == 0
    # A late row makes its minute stale: that one minute's rollup row is read (and subtracted).
    await db.copy_predictions([rec(t0 + timedelta(minutes=7, seconds=30))])
    assert await rollup_rows_read() == 1
    [stats] = await db.stats("m")
    assert stats.predictions == 601


async def test_status_sees_watermark_and_totals_in_one_snapshot(db: StoreDB) -> None:
    """A refresh committing between reading the watermark and the totals must not count the
    minutes it materialized twice (once in the totals, once as raw rows after the watermark)."""
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    await db.copy_predictions([rec(t0 + timedelta(seconds=10 * i)) for i in range(60)])
    await db.refresh_rollup(now=t0 + timedelta(minutes=11))

    async def status_with_refresh_in_between(snapshot: bool, refresh_at: datetime) -> int:
        async with db.pool.connection() as c, c.transaction():
            if snapshot:
                await c.execute(STATS_SNAPSHOT)
            row = await (await c.execute(queries.MATERIALIZED_TO)).fetchone()
            assert row is not None
            # The injected race: another connection materializes the newer rows now.
            assert (await db.refresh_rollup(now=refresh_at)).minutes > 0
            params = stats_params(None, row[0], row[2])
            rows = await (await c.execute(queries.STATS, params)).fetchall()
        return int(rows[0][1])

    # Positive control: without one snapshot the race shows: 140 where raw rows say 100 (the
    # 40 rows the refresh materialized counted in the totals and again after the watermark).
    await db.copy_predictions([rec(t0 + timedelta(minutes=12, seconds=i)) for i in range(40)])
    assert await status_with_refresh_in_between(False, t0 + timedelta(minutes=14)) == 140
    await db.copy_predictions([rec(t0 + timedelta(minutes=15, seconds=i)) for i in range(40)])
    assert await status_with_refresh_in_between(True, t0 + timedelta(minutes=17)) == 140  # right
    assert (
        [f[1] for f in await _figures(db)] == [140] == [f[1] for f in await _figures(db, raw=True)]
    )  # type: ignore[index]
