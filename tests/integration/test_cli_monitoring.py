"""The monitoring side of the CLI (`label`, `status`, `plan`, `alerts`, `plugins`) against a
real store and monitor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc import aio
from typer.testing import CliRunner, Result

from cyclone.client import MonitorClient
from cyclone.ids import uuid7_batch
from cyclone.monitor.v1 import monitor_service_pb2 as mpb
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone_app.cli import app
from services.launch import start_monitor, start_store
from services.monitor.main import MonitorSettings
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

MODEL = "churn"


@dataclass
class Mesh:
    store: str
    monitor: str
    ids: list[str]


async def cli(*args: str) -> Result:
    # The servers run on this event loop; the CLI's blocking calls must not.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


@pytest.fixture
async def mesh(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    store_server = (
        await start_store(
            StoreSettings(
                port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    store_address = f"127.0.0.1:{store_server.port}"
    monitor_server = (
        await start_monitor(
            MonitorSettings(port=0, store=store_address, data_dir=tmp_path, log_level="WARNING"),
            schedule=False,
        )
    ).server
    try:
        async with aio.insecure_channel(store_address) as channel:
            stub = store_grpc.StoreServiceStub(channel)
            schema = {"features": [{"name": "x", "kind": "numeric"}], "class_labels": ["0", "1"]}
            version = store_pb.ModelVersion(
                model=MODEL, version="1", task="classification", schema_json=json.dumps(schema)
            )
            await stub.RegisterModelVersion(
                store_pb.RegisterModelVersionRequest(model_version=version)
            )
            await stub.SetModelStatus(
                store_pb.SetModelStatusRequest(
                    model=MODEL, version="1", status=store_pb.MODEL_STATUS_SERVING
                )
            )
            ids = uuid7_batch(3)
            batch = store_pb.LogPredictionsRequest()
            for i, pid in enumerate(ids):
                batch.records.add(
                    prediction_id=pid,
                    model=MODEL,
                    version="1",
                    input_json=json.dumps({"x": float(i)}).encode(),
                    output_json=json.dumps(
                        {"label": "1", "probabilities": {"0": 0.2, "1": 0.8}}
                    ).encode(),
                )

            async def one() -> AsyncIterator[store_pb.LogPredictionsRequest]:
                yield batch

            await stub.LogPredictions(one())
        yield Mesh(store_address, f"127.0.0.1:{monitor_server.port}", ids)
    finally:
        await monitor_server.stop(0)
        await store_server.stop(0)


async def test_label_then_status_shows_coverage(mesh: Mesh, tmp_path: Path) -> None:
    result = await cli(
        "label", "--model", MODEL, "--id", mesh.ids[0], "--value", "1", "--store", mesh.store
    )
    assert result.exit_code == 0, result.output
    assert "stored 1 label(s)" in result.output
    labels = tmp_path / "labels.csv"
    labels.write_text("prediction_id,label\n" + "".join(f"{pid},0\n" for pid in mesh.ids[1:]))
    result = await cli("label", "--model", MODEL, "--file", str(labels), "--store", mesh.store)
    assert result.exit_code == 0 and "stored 2 label(s)" in result.output, result.output

    result = await cli("status", "--store", mesh.store, "--monitor", mesh.monitor)
    assert result.exit_code == 0, result.output
    assert "storage mode: postgres-partitioned" in result.output
    row = next(line for line in result.output.splitlines() if MODEL in line)
    assert "100.0%" in row and " 3 " in row


async def test_label_bad_input(mesh: Mesh, tmp_path: Path) -> None:
    result = await cli(
        "label", "--model", MODEL, "--id", mesh.ids[0], "--value", "7", "--store", mesh.store
    )
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.output and "'7' is not a class" in result.output
    result = await cli("label", "--model", MODEL, "--id", mesh.ids[0], "--store", mesh.store)
    assert result.exit_code == 2 and "same number of times" in result.output
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"prediction_id": "x"}\n')
    result = await cli("label", "--model", MODEL, "--file", str(bad), "--store", mesh.store)
    assert result.exit_code == 2 and "labels.jsonl:1" in result.output
    result = await cli(
        "label", "--model", "nope", "--id", mesh.ids[0], "--value", "1", "--store", mesh.store
    )
    assert result.exit_code == 1 and "NOT_FOUND" in result.output


async def test_plan_get_set_and_alerts(mesh: Mesh, tmp_path: Path) -> None:
    result = await cli("plan", "get", MODEL, "--monitor", mesh.monitor)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# revision 0 (generated default)")
    assert f"model: {MODEL}" in result.output

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(f"model: {MODEL}\nmetrics: [no_such_metric]\n")
    result = await cli("plan", "set", MODEL, str(invalid), "--monitor", mesh.monitor)
    assert result.exit_code == 1
    assert "metrics[0]" in result.output and "no_such_metric" in result.output

    # A trigger that always fires (a missing rate is never below 0), so the next evaluation
    # leaves GREEN and raises alerts even on three unlabelled rows.
    plan = default_plan(MODEL, "classification")
    text = plan_to_yaml(plan).replace(
        "triggers:",
        "triggers:\n- metric: feature_missing_rate\n  condition: above\n  threshold: -1\n  level: AMBER",
        1,
    )
    valid = tmp_path / "plan.yaml"
    valid.write_text(text)
    result = await cli("plan", "set", MODEL, str(valid), "--monitor", mesh.monitor)
    assert result.exit_code == 0 and "revision 1" in result.output, result.output

    def evaluate() -> tuple[str, list[str]]:
        with MonitorClient(mesh.monitor) as client:
            status = client.evaluate_now(MODEL).status
            return mpb.Level.Name(status.level).removeprefix("LEVEL_"), list(status.actions)

    level, actions = await asyncio.to_thread(evaluate)
    assert level in ("AMBER", "RED") and "notify" in actions
    result = await cli("alerts", "--model", MODEL, "--monitor", mesh.monitor)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(actions)
    for action in actions:
        assert any(f"{MODEL} 1 {level} {action}->record" in line for line in lines), lines
    assert all("feature_missing_rate = 0 is above -1" in line for line in lines)

    result = await cli(
        "plan", "set", MODEL, str(tmp_path / "missing.yaml"), "--monitor", mesh.monitor
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_plugins_list_shows_builtins() -> None:
    result = CliRunner().invoke(app, ["plugins", "list"])
    assert result.exit_code == 0, result.output
    for name in ("accuracy", "wasserstein", "webhook"):
        assert name in result.output
