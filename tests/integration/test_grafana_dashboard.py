"""deploy/grafana's dashboard: every panel's SQL runs against a real store database.

Data goes in through the store's gRPC API (versions with lineage, predictions with latency,
labels, an evaluation with metric points and an alert, a retraining job, a rollout); then each
query runs with Grafana's macros replaced by what Grafana would send, and must return rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from grpc import aio

from cyclone.ids import uuid7_batch
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "cyclone-dashboard.json"
MODEL = "credit"
SCHEMA = {
    "features": [{"name": "age", "kind": "numeric"}],
    "class_labels": ["0", "1"],
}


def grafana_sql(sql: str, start: datetime, end: datetime) -> str:
    """The query as Grafana's PostgreSQL data source sends it for this time range and model."""
    iso = {"from": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "to": end.strftime("%Y-%m-%dT%H:%M:%SZ")}
    sql = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        lambda m: f"{m.group(1)} BETWEEN '{iso['from']}' AND '{iso['to']}'",
        sql,
    )
    sql = sql.replace("$__timeFrom()", f"'{iso['from']}'").replace("$__timeTo()", f"'{iso['to']}'")
    sql = sql.replace("${model}", MODEL).replace("$model", MODEL)
    leftover = re.findall(r"\$\{?\w+", sql)
    assert not leftover, f"macros the test does not know: {leftover}"
    return sql


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, format, SQL) of every panel target, the template variables and annotations."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            out.append((panel["title"], target["format"], target["rawSql"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"variable {variable['name']}", "table", variable["query"]))
    for annotation in dashboard["annotations"]["list"]:
        out.append((f"annotation {annotation['name']}", "table", annotation["target"]["rawSql"]))
    return out


@pytest.fixture
async def stub(fresh_database_url: str) -> AsyncIterator[pb_grpc.StoreServiceStub]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as store, aio.insecure_channel(store.address) as ch:
        yield pb_grpc.StoreServiceStub(ch)


async def fill(stub: pb_grpc.StoreServiceStub) -> None:
    for version, parent in (("1", ""), ("2", "1")):
        await stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(
                model_version=pb.ModelVersion(
                    model=MODEL,
                    version=version,
                    task="classification",
                    sha256=version * 64,
                    schema_json=json.dumps(SCHEMA),
                    artifact_uri=f"/models/{MODEL}/{version}",
                    parent_version=parent,
                    family="refit" if parent else "",
                    training_rows=500 if parent else 0,
                )
            )
        )
    await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=MODEL, version="1", status=pb.MODEL_STATUS_SERVING)
    )
    ids = uuid7_batch(30)
    records = [
        pb.PredictionRecord(
            prediction_id=pid,
            model=MODEL,
            version="1" if i < 20 else "2",
            input_json=json.dumps({"age": 30 + i}).encode(),
            output_json=json.dumps({"label": str(i % 2), "probabilities": {"1": 0.4}}).encode(),
            latency_ms=1.0 + i / 10,
        )
        for i, pid in enumerate(ids)
    ]
    logged = await stub.LogPredictions(iter([pb.LogPredictionsRequest(records=records)]))
    assert logged.inserted == 30
    await stub.AddLabels(
        pb.AddLabelsRequest(
            model=MODEL, labels=[pb.Label(prediction_id=p, text="1") for p in ids[:12]]
        )
    )
    now = datetime.now(UTC)
    outcome = await stub.RecordEvaluation(
        pb.RecordEvaluationRequest(
            model=MODEL,
            version="1",
            level="AMBER",
            reasons_json=json.dumps(["accuracy = 0.5 is below 0.9"]),
            summary_json=json.dumps({"rows": 30, "labelled_rows": 12}),
            points=[
                pb.MetricPoint(created_at=_ts(now), metric="accuracy", value=0.5),
                pb.MetricPoint(created_at=_ts(now), metric="drift.psi.age", value=0.3),
                pb.MetricPoint(created_at=_ts(now), metric="level", value=1.0),
            ],
            alerts=[
                pb.AlertRecord(
                    reasons_json=json.dumps(["accuracy"]),
                    targets=[pb.AlertTarget(action="retrain", sink="record")],
                )
            ],
        )
    )
    assert outcome.level_changed and outcome.alert_ids
    await stub.CreateTrainingJob(
        pb.CreateTrainingJobRequest(model=MODEL, alert_id=outcome.alert_ids[0], reason="drop")
    )
    created = await stub.CreateRollout(
        pb.CreateRolloutRequest(
            rollout=pb.RolloutRecord(
                model=MODEL,
                from_version="1",
                to_version="2",
                strategy="canary",
                state="progressing",
                current_weight=10,
                weights_json=json.dumps({"credit-1": 90, "credit-2": 10}),
            ),
            event=pb.RolloutEvent(state="progressing", weight=10, decision="start"),
        )
    )
    await stub.UpdateRollout(
        pb.UpdateRolloutRequest(
            rollout_id=created.rollout.id,
            state="progressing",
            current_weight=50,
            weights_json=json.dumps({"credit-1": 50, "credit-2": 50}),
            events=[pb.RolloutEvent(state="progressing", weight=50, decision="advance")],
        )
    )


def _ts(value: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    out = Timestamp()
    out.FromDatetime(value)
    return out


def test_dashboard_json_is_a_grafana_dashboard_on_a_postgresql_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "grafana-postgresql-datasource", panel["title"]
        assert panel["targets"] and all(t["rawSql"].strip() for t in panel["targets"])
        # time_bucket exists only on TimescaleDB: the panels must work on plain PostgreSQL too.
        assert "time_bucket" not in json.dumps(panel["targets"]), panel["title"]


async def test_every_panel_query_runs_on_the_store_database_and_returns_rows(
    stub: pb_grpc.StoreServiceStub, fresh_database_url: str
) -> None:
    await fill(stub)
    dashboard = json.loads(DASHBOARD.read_text())
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=5)
    async with await psycopg.AsyncConnection.connect(fresh_database_url) as conn:
        await conn.set_read_only(True)  # Grafana's data source user needs no more
        checked = queries(dashboard)
        assert len(checked) == len(dashboard["panels"]) + 2  # + the model variable, annotation
        for where, fmt, sql in checked:
            cur = await conn.execute(grafana_sql(sql, start, end).encode())
            assert cur.description is not None, where
            columns = [c.name for c in cur.description]
            rows = await cur.fetchall()
            assert rows, f"{where}: no rows"
            if fmt == "time_series":
                assert columns[0] == "time", (where, columns)
                assert all(isinstance(r[0], datetime) for r in rows), where
                assert all(isinstance(r[-1], float) or r[-1] is None for r in rows), where
                assert any(r[-1] is not None for r in rows), where


def test_every_panel_query_runs_on_timescaledb(tmp_path: Path) -> None:
    """The same queries on the TimescaleDB schema (hypertables, continuous aggregate), in PGlite."""
    import subprocess

    from services.store.db import uuid7, uuid7_time
    from services.store.migrations import migrations_for
    from tests.integration.test_timescale_sql import PREFIX, SCRIPT, _ensure_pglite, _step

    _ensure_pglite()
    now = datetime.now(UTC)
    predictions = []
    for i in range(6):
        pid = uuid7(now - timedelta(seconds=30 * i))
        predictions.append(
            {
                "prediction_id": str(pid),
                "created_at": uuid7_time(pid).isoformat(),
                "model": MODEL,
                "version": "1" if i % 2 else "2",
                "input": {"age": i},
                "output": {"label": "1"},
                "latency_ms": 1.0 + i,
                "trace_id": None,
            }
        )
    steps: list[dict[str, Any]] = [
        {"name": f"migration_{m.version}", "sql": m.sql, "exec": True}
        for m in migrations_for("timescaledb")
    ]
    data = f"""
    INSERT INTO model_versions (model, version, status, parent_version, family, training_rows)
    VALUES ('{MODEL}', '1', 'serving', NULL, NULL, NULL), ('{MODEL}', '2', 'staged', '1', 'refit', 500);
    INSERT INTO labels (prediction_id, label, model) VALUES ('{predictions[0]["prediction_id"]}', '"1"', '{MODEL}');
    INSERT INTO metric_points (created_at, model, version, metric, value, level) VALUES
      (now(), '{MODEL}', '1', 'accuracy', 0.5, 'AMBER'), (now(), '{MODEL}', '1', 'drift.psi.age', 0.3, 'AMBER'),
      (now(), '{MODEL}', '1', 'level', 1, 'AMBER');
    INSERT INTO model_health (model, version, level) VALUES ('{MODEL}', '1', 'AMBER');
    INSERT INTO alerts (model, version, level) VALUES ('{MODEL}', '1', 'AMBER');
    INSERT INTO training_jobs (model, reason) VALUES ('{MODEL}', 'drop');
    INSERT INTO rollouts (model, from_version, to_version, status, weights, current_weight)
    VALUES ('{MODEL}', '1', '2', 'progressing', '{{"credit-1": 50, "credit-2": 50}}', 50);
    INSERT INTO rollout_events (rollout_id, seq, state, weight, decision)
    SELECT id, 1, 'progressing', 50, 'advance' FROM rollouts;
    """
    steps.append({"name": "data", "sql": data, "exec": True})
    steps.append(
        _step(
            "predictions",
            "INSERT INTO predictions"
            " SELECT * FROM json_populate_recordset(null::predictions, %(rows)s::json)",
            {"rows": json.dumps(predictions)},
        )
    )
    dashboard = json.loads(DASHBOARD.read_text())
    start, end = now - timedelta(hours=1), now + timedelta(minutes=5)
    checked = queries(dashboard)
    steps += [
        {"name": where, "sql": grafana_sql(sql, start, end), "params": []}
        for where, _, sql in checked
    ]
    steps_file = tmp_path / "steps.json"
    steps_file.write_text(json.dumps(steps))
    proc = subprocess.run(
        ["node", str(SCRIPT), str(PREFIX), str(steps_file)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    errors = {k: v["error"] for k, v in out.items() if "error" in v}
    assert not errors, errors
    empty = [where for where, _, _ in checked if not out[where]["rows"]]
    assert not empty, f"no rows on TimescaleDB: {empty}"
