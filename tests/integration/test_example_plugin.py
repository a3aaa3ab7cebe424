"""Install tests/example_plugin into a temp target and check Cyclone finds and runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[1] / "example_plugin"

CHECK = textwrap.dedent(
    """
    import json
    import numpy as np
    from cyclone import plugins
    from cyclone.plugin_api import Window
    from cyclone.plan import parse_plan
    from services.monitor.evaluate import evaluate

    facade = plugins.get_plugins()
    spec = facade.metrics["example_mean_prediction"]
    info = {i.name: i for i in plugins.plugin_infos()}["example"]
    plan = parse_plan("model: m\\nmetrics: [example_mean_prediction, mae]\\n")
    window = Window({}, np.array([1.0, 2.0, 6.0]), labels=np.array([1.0, 2.0, 3.0]),
                    task="regression")
    ev = evaluate(plan, window)
    print(json.dumps({
        "plugin": spec.plugin,
        "distribution": info.distribution,
        "version": info.version,
        "value": ev.metrics["example_mean_prediction"].value,
        "mae_status": ev.metrics["mae"].status,
    }))
    """
)


def run_check(target: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(target), **env}
    return subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=full_env, timeout=120
    )


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A temp --target keeps the venv untouched; the directory goes away with tmp_path.
    out = tmp_path_factory.mktemp("example_plugin_site")
    # Build from a copy so setuptools' build/ and egg-info never land in the source tree.
    source = tmp_path_factory.mktemp("example_plugin_src") / "example_plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(out),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    return out


def test_example_metric_is_found_and_computed(target: Path) -> None:
    proc = run_check(target)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["plugin"] == "example"
    assert got["distribution"] == "cyclone-example-plugin" and got["version"] == "0.1.0"
    assert got["value"] == pytest.approx(3.0)
    assert got["mae_status"] == "not_enough_data"  # 3 labelled rows < default min_labelled_rows


def test_example_plugin_can_be_disabled(target: Path) -> None:
    proc = run_check(target, CYCLONE_DISABLE_PLUGINS="example")
    assert proc.returncode != 0
    assert "example_mean_prediction" in proc.stderr


MONITOR_CHECK = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path

    from grpc import aio

    from cyclone.ids import uuid7_batch
    from cyclone.monitor.v1 import monitor_service_pb2 as pb
    from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
    from cyclone.store.v1 import store_service_pb2 as spb
    from cyclone.store.v1 import store_service_pb2_grpc as sgrpc
    from services.launch import start_monitor, start_store
    from services.monitor.main import MonitorSettings
    from services.store.main import StoreSettings

    VALUES = json.loads(os.environ["CHECK_VALUES"])
    PLAN = "model: m\\nmetrics: [example_mean_prediction, mae]\\n"


    async def main() -> None:
        tmp = Path(sys.argv[1])
        store = (await start_store(StoreSettings(
            port=0, database_url=os.environ["CHECK_DATABASE_URL"], log_level="WARNING", pool_min_size=1))).server
        monitor = None
        try:
            monitor = (await start_monitor(MonitorSettings(
                port=0, store=f"127.0.0.1:{store.port}", alert_record_path=tmp / "alerts.jsonl",
                log_level="WARNING", data_dir=tmp), schedule=False)).server
            async with aio.insecure_channel(f"127.0.0.1:{store.port}") as sc, \\
                    aio.insecure_channel(f"127.0.0.1:{monitor.port}") as mc:
                s, m = sgrpc.StoreServiceStub(sc), pb_grpc.MonitorServiceStub(mc)
                schema = {"name": "m", "version": "1", "task": "regression",
                          "features": [{"name": "x", "kind": "numeric", "dtype": "float32"}]}
                await s.RegisterModelVersion(spb.RegisterModelVersionRequest(model_version=spb.ModelVersion(
                    model="m", version="1", task="regression", sha256="0" * 64, artifact_uri=str(tmp),
                    schema_json=json.dumps(schema)), if_not_exists=True), timeout=10)
                await s.SetModelStatus(spb.SetModelStatusRequest(
                    model="m", version="1", status=spb.MODEL_STATUS_SERVING), timeout=10)

                async def batches():
                    yield spb.LogPredictionsRequest(records=[
                        spb.PredictionRecord(prediction_id=i, model="m", version="1",
                                             input_json=json.dumps({"x": v}).encode(),
                                             output_json=json.dumps({"value": v}).encode())
                        for i, v in zip(uuid7_batch(len(VALUES)), VALUES)])

                logged = await s.LogPredictions(batches(), timeout=10)
                revision = (await m.SetPlan(pb.SetPlanRequest(model="m", plan_yaml=PLAN), timeout=10)).revision
                status = (await m.EvaluateNow(pb.EvaluateNowRequest(model="m"), timeout=30)).status
                metrics = {x.name: x for x in status.metrics}
                print(json.dumps({
                    "inserted": logged.inserted,
                    "revision": revision,
                    "plan_revision": status.plan_revision,
                    "rows": status.rows,
                    "value": metrics["example_mean_prediction"].value,
                    "status": metrics["example_mean_prediction"].status,
                    "mae_status": metrics["mae"].status,
                }))
        finally:
            if monitor is not None:
                await monitor.stop(0)
            await store.stop(0)


    asyncio.run(main())
    """
)


def test_example_metric_is_computed_by_the_monitor_service(
    target: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    values = [1.0, 2.0, 6.0, 7.5]
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
        "CHECK_DATABASE_URL": fresh_database_url,
        "CHECK_VALUES": json.dumps(values),
    }
    proc = subprocess.run(
        [sys.executable, "-c", MONITOR_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["inserted"] == len(values) and got["rows"] == len(values)
    # SetPlan accepted the plugin's metric name, and EvaluateNow used that stored plan.
    assert got["revision"] == 1 and got["plan_revision"] == 1
    assert got["status"] == "ok"
    assert got["value"] == pytest.approx(sum(values) / len(values))
    assert got["mae_status"] == "not_enough_data"  # no labels

    # Without the plugin the same plan is refused by SetPlan, naming the field.
    env["CYCLONE_DISABLE_PLUGINS"] = "example"
    proc = subprocess.run(
        [sys.executable, "-c", MONITOR_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "INVALID_ARGUMENT" in proc.stderr
    assert "metrics[0]: unknown metric 'example_mean_prediction'" in proc.stderr
