"""StoreDB against a real (embedded) PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from services.store.db import (
    Alert,
    AlreadyExistsError,
    FeatureFilter,
    MetricPoint,
    ModelVersion,
    PredictionRecord,
    StoreDB,
    uuid7,
    uuid7_time,
)
from services.store.embedded import start_embedded
from services.store.migrations import migrations_for, run_migrations

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def rec(
    at: datetime,
    model: str = "iris",
    version: str = "1",
    inp: dict[str, object] | None = None,
    out: dict[str, object] | None = None,
    latency: float = 1.0,
) -> PredictionRecord:
    pid = uuid7(at)
    return PredictionRecord(
        pid,
        uuid7_time(pid),
        model,
        version,
        json.dumps(inp if inp is not None else {"x": 1.0}),
        json.dumps(out if out is not None else {"label": "a"}),
        latency,
        "trace",
    )


@pytest.fixture
async def db(fresh_database_url: str) -> AsyncIterator[StoreDB]:
    store = StoreDB(min_size=1, max_size=4)
    await store.open(fresh_database_url)
    yield store
    await store.close()


def test_uuid7_roundtrip() -> None:
    at = datetime(2025, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    u = uuid7(at)
    assert u.version == 7
    assert uuid7_time(u) == at
    assert uuid7_time(str(u)) == at


async def test_migrations_idempotent_and_sql_uuid7_time(empty_database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as c:
        assert await run_migrations(c) == "postgres-partitioned"
        assert await run_migrations(c) == "postgres-partitioned"
        cur = await c.execute("SELECT version, mode FROM schema_migrations ORDER BY version")
        expected = [
            (m.version, "postgres-partitioned") for m in migrations_for("postgres-partitioned")
        ]
        assert len(expected) >= 3
        assert await cur.fetchall() == expected
        u = uuid7(datetime(2025, 3, 4, 5, 6, 7, 891000, tzinfo=UTC))
        cur = await c.execute("SELECT uuid7_time(%s)", (u,))
        row = await cur.fetchone()
        assert row is not None and row[0] == uuid7_time(u)
    store = StoreDB()
    await store.open(empty_database_url)  # a third run through open(): still a no-op
    assert store.mode == "postgres-partitioned"
    await store.close()


async def test_copy_ingest_and_idempotent_replay(db: StoreDB) -> None:
    rows = [rec(T0 + timedelta(seconds=i)) for i in range(500)]
    assert await db.copy_predictions(rows) == 500
    assert await db.copy_predictions(rows) == 0  # replayed batch: stored once
    more = [rec(T0 + timedelta(seconds=600 + i)) for i in range(10)]
    assert await db.copy_predictions(rows[:5] + more) == 10  # partial overlap
    # ids as str and created_at derived from the id are accepted too
    extra = rec(T0 + timedelta(hours=1))
    extra = extra._replace(prediction_id=str(extra.prediction_id), created_at=None)
    assert await db.copy_predictions([extra]) == 1
    (s,) = await db.stats("iris")
    assert s.predictions == 511
    got = await db.get_prediction(extra.prediction_id)
    assert got is not None and got.created_at == T0 + timedelta(hours=1)
    assert got.input == {"x": 1.0} and got.trace_id == "trace"


async def test_labels_before_after_replace_and_unmatched(db: StoreDB) -> None:
    early = rec(T0, out={"label": "a"})
    late = rec(T0 + timedelta(seconds=1), out={"label": "b"})
    await db.copy_predictions([early])
    # label for `late` arrives before its prediction
    res = await db.add_labels([(early.prediction_id, '"a"'), (late.prediction_id, '"x"')])
    assert res.stored == 2
    assert res.unmatched == [late.prediction_id]
    await db.copy_predictions([late])
    res = await db.add_labels([(str(late.prediction_id), '"b"')])  # replaces "x"
    assert (res.stored, res.unmatched) == (1, [])
    row = await db.get_prediction(late.prediction_id)
    assert row is not None and row.label == "b"
    (s,) = await db.stats("iris")
    assert (s.predictions, s.labels, s.label_coverage) == (2, 2, 1.0)
    assert s.ingest_lag_seconds is not None and s.ingest_lag_seconds > 0


async def test_training_data_window_and_last_n(db: StoreDB) -> None:
    rows = [rec(T0 + timedelta(seconds=i), inp={"x": i}) for i in range(250)]
    other = [rec(T0 + timedelta(seconds=i), model="other") for i in range(20)]
    await db.copy_predictions(rows + other)
    # label every other row, plus all of the other model
    await db.add_labels([(r.prediction_id, str(i)) for i, r in enumerate(rows) if i % 2 == 0])
    await db.add_labels([(r.prediction_id, "0") for r in other])

    chunks = [
        c async for c in db.training_data("iris", T0, T0 + timedelta(seconds=100), chunk_rows=20)
    ]
    assert [len(c) for c in chunks] == [20, 20, 10]
    ids = [i for c in chunks for i in c.prediction_ids]
    assert ids == [r.prediction_id for r in rows[:100:2]]
    assert [x["x"] for c in chunks for x in c.inputs()] == list(range(0, 100, 2))
    assert [lab for c in chunks for lab in c.labels()] == list(range(0, 100, 2))
    assert chunks[0].outputs()[0] == {"label": "a"}
    assert all(list(c.created_at) == sorted(c.created_at) for c in chunks)

    last = [c async for c in db.training_data("iris", last_n=7, chunk_rows=100)]
    assert len(last) == 1
    assert list(last[0].prediction_ids) == [r.prediction_id for r in rows[::2][-7:]]
    # last N of a window, and filtered by version
    win = [c async for c in db.training_data("iris", T0, T0 + timedelta(seconds=10), last_n=2)]
    assert list(win[0].prediction_ids) == [rows[6].prediction_id, rows[8].prediction_id]
    assert [c async for c in db.training_data("iris", last_n=5, version="2")] == []
    with pytest.raises(ValueError):
        _ = [c async for c in db.training_data("iris")]


async def test_query_pagination_wrong_only_and_filters(db: StoreDB) -> None:
    cls = [
        rec(
            T0 + timedelta(seconds=i),
            inp={"age": i, "city": "a" if i % 2 else "b"},
            out={"label": "yes", "probabilities": {"yes": 0.9, "no": 0.1}},
        )
        for i in range(30)
    ]
    reg = [rec(T0 + timedelta(seconds=i), model="price", out={"value": 10.0}) for i in range(5)]
    await db.copy_predictions(cls + reg)
    # labels: first 10 correct, 10..14 wrong; "yes" vs label 1.0-style equality handled
    await db.add_labels([(r.prediction_id, '"yes"') for r in cls[:10]])
    await db.add_labels([(r.prediction_id, '"no"') for r in cls[10:15]])
    await db.add_labels(
        [(r.prediction_id, str(v)) for r, v in zip(reg, [10, 10.4, 12, 7, 10.0], strict=True)]
    )

    seen = []
    token = None
    while True:
        page, token = await db.query_predictions("iris", page_size=7, page_token=token)
        seen += page
        if token is None:
            break
    assert [r.prediction_id for r in seen] == [r.prediction_id for r in cls]

    lab, _ = await db.query_predictions("iris", labelled=True, page_size=100)
    assert len(lab) == 15
    unl, _ = await db.query_predictions("iris", labelled=False, page_size=100)
    assert len(unl) == 15
    wrong, _ = await db.query_predictions("iris", wrong_only=True, page_size=100)
    assert [r.prediction_id for r in wrong] == [r.prediction_id for r in cls[10:15]]
    assert all(r.label == "no" for r in wrong)
    wrong_reg, _ = await db.query_predictions("price", wrong_only=True, tolerance=0.5)
    assert [r.label for r in wrong_reg] == [12, 7]

    ge, _ = await db.query_predictions(
        "iris", feature_filter=FeatureFilter("age", ">=", 25), page_size=100
    )
    assert [r.input["age"] for r in ge] == [25, 26, 27, 28, 29]
    eq, _ = await db.query_predictions(
        "iris", feature_filter=FeatureFilter("city", "=", "a"), page_size=100
    )
    assert len(eq) == 15
    # type mismatch never matches (no cast errors)
    assert (await db.query_predictions("iris", feature_filter=FeatureFilter("city", ">", 1)))[
        0
    ] == []
    # the feature name is a bound parameter: an injection attempt is just a missing key
    evil = "age'); DROP TABLE predictions; --"
    res, _ = await db.query_predictions("iris", feature_filter=FeatureFilter(evil, "=", 1))
    assert res == []
    with pytest.raises(ValueError):
        await db.query_predictions(
            "iris",
            feature_filter=FeatureFilter("age", "; DROP TABLE labels", 1),  # type: ignore[arg-type]
        )
    (s,) = await db.stats("iris")
    assert s.predictions == 30
    with pytest.raises(ValueError):
        await db.query_predictions("iris", page_token="not-a-token")


async def test_registry_status_changes(db: StoreDB) -> None:
    v1 = await db.register_model_version(
        ModelVersion(
            "iris",
            "1",
            artifact_uri="file:///m/1",
            task="classification",
            evaluation={"accuracy": 0.9},
        )
    )
    assert v1.status == "staged" and v1.created_at is not None
    with pytest.raises(AlreadyExistsError):
        await db.register_model_version(ModelVersion("iris", "1"))
    await db.register_model_version(
        ModelVersion(
            "iris",
            "2",
            parent_version="1",
            training_window_start=T0,
            training_window_end=T0 + timedelta(days=1),
            reference_profile={"x": [1, 2]},
        )
    )
    await db.set_model_status("iris", "1", "serving")
    await db.set_model_status("iris", "2", "canary")
    promoted = await db.set_model_status("iris", "2", "serving")
    assert promoted.status == "serving"
    v1b = await db.get_model_version("iris", "1")
    assert v1b is not None and v1b.status == "retired" and v1b.evaluation == {"accuracy": 0.9}
    latest = await db.latest_version("iris")
    assert latest is not None and latest.version == "2" and latest.parent_version == "1"
    assert latest.training_window_start == T0
    assert [v.version for v in await db.list_model_versions("iris")] == ["1", "2"]
    assert await db.get_model_version("iris", "9") is None
    assert await db.latest_version("nope") is None


async def test_plans(db: StoreDB) -> None:
    assert await db.get_plan("iris") is None
    assert await db.save_plan("iris", "a: 1\n") == 1
    assert await db.save_plan("iris", "a: 2\n") == 2
    latest = await db.get_plan("iris")
    assert latest is not None and (latest.revision, latest.plan_yaml) == (2, "a: 2\n")
    first = await db.get_plan("iris", 1)
    assert first is not None and first.plan_yaml == "a: 1\n"


async def test_alert_outbox_in_one_transaction(db: StoreDB) -> None:
    now = datetime.now(UTC)
    async with db.transaction() as tx:
        await db.insert_metric_points(
            [MetricPoint(now, "iris", "1", "accuracy", 0.6, "RED", {"n": 100})], conn=tx
        )
        aid = await db.insert_alert_in_tx(
            tx, Alert("iris", "RED", version="1", previous_level="GREEN", reasons=["acc < 0.7"])
        )
    # a rolled-back transaction leaves neither
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await db.insert_alert(Alert("iris", "AMBER"), conn=tx)
            raise RuntimeError("boom")
    assert [a.id for a in await db.list_alerts("iris")] == [aid]
    pts = await db.metric_points("iris", now - timedelta(minutes=1), now + timedelta(minutes=1))
    assert [(p.metric, p.value, p.details) for p in pts] == [("accuracy", 0.6, {"n": 100})]

    due = await db.due_alerts(now + timedelta(seconds=1))
    assert [a.id for a in due] == [aid] and due[0].reasons == ["acc < 0.7"]
    assert await db.due_alerts(now + timedelta(seconds=1)) == []  # claimed (leased)
    await db.mark_alert_failed(aid, "sink down", now + timedelta(seconds=5))
    assert await db.due_alerts(now + timedelta(seconds=2)) == []
    again = await db.due_alerts(now + timedelta(seconds=6))
    assert again[0].attempts == 1 and again[0].last_error == "sink down"
    await db.mark_alert_delivered(aid)
    await db.acknowledge_alert(aid)
    (a,) = await db.list_alerts("iris", status="acknowledged")
    assert a.delivered_at is not None and a.acknowledged_at is not None and a.attempts == 2
    assert await db.due_alerts(now + timedelta(days=1)) == []


async def test_partitions_ahead_default_and_stats(db: StoreDB) -> None:
    today = datetime.now(UTC).date()
    async with db.pool.connection() as c:
        cur = await c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'predictions'::regclass ORDER BY 1"
        )
        parts = [r[0] for r in await cur.fetchall()]
    assert f"predictions_p{today + timedelta(days=7):%Y%m%d}" in parts
    assert "predictions_default" in parts
    far = datetime.now(UTC) + timedelta(days=400)
    near = datetime.now(UTC) + timedelta(days=20)
    await db.copy_predictions([rec(far), rec(near)])
    async with db.pool.connection() as c:
        cur = await c.execute("SELECT count(*) FROM predictions_default")
        assert (await cur.fetchone()) == (2,)
    # creating the partition for `near` moves its row out of the default partition
    created = await db.ensure_partitions(ahead_days=21)
    assert f"predictions_p{near.date():%Y%m%d}" in created
    assert await db.ensure_partitions(ahead_days=21) == []
    async with db.pool.connection() as c:
        cur = await c.execute("SELECT count(*) FROM predictions_default")
        assert (await cur.fetchone()) == (1,)
    # rows are still found by id (partition pruning via uuid7_time)
    assert (await db.get_prediction(rec(near).prediction_id)) is None


async def test_prediction_stats_per_minute(db: StoreDB) -> None:
    rows = [
        rec(T0 + timedelta(seconds=10 * i), model="price", out={"value": float(i)}, latency=i)
        for i in range(12)
    ]
    await db.copy_predictions(rows)
    st = await db.prediction_stats("price", T0, T0 + timedelta(minutes=5))
    assert [(s.predictions, s.max_latency_ms, s.avg_value) for s in st] == [
        (6, 5.0, 2.5),
        (6, 11.0, 8.5),
    ]
    assert st[0].p50_latency_ms == 2.5 and st[0].bucket == T0


def test_embedded_restart_after_kill(tmp_path: Path) -> None:
    """A live orphan server is adopted; a SIGKILLed one leaves a stale pid file that is cleared."""
    first = start_embedded(tmp_path, fast_unsafe=True)
    adopted = start_embedded(tmp_path, fast_unsafe=True)  # e.g. the store restarted
    assert adopted.adopted and adopted.url == first.url
    pid = int((tmp_path / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):  # wait until the postmaster is gone (it is our child's child)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    again = start_embedded(tmp_path, fast_unsafe=True)
    try:
        assert not again.adopted
        with psycopg.connect(again.url) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        again.stop()
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists()
