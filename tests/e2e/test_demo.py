"""The README's main command, as a user runs it: the whole loop through the mesh `cyclone up`
starts, then the store reopened on the demo's data dir to check what it recorded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from grpc import aio

from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.main import StoreSettings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]


def _left_behind(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "cyclone_app", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=380,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(workdir)},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir, result.stdout


def test_the_story_in_order_with_no_failed_request(demo: tuple[Path, str]) -> None:
    _, out = demo
    steps = [
        "level GREEN",
        "level RED",
        "features drifted",
        "job SUCCEEDED",
        "v2 at 20% of traffic",
        "v2 at 100% of traffic",
        "rollout PROMOTED",
        "v2 level",
    ]
    positions = [out.index(step) for step in steps]
    assert positions == sorted(positions), out
    assert re.search(r"requests through Envoy \(\d+ REST\), 0 failed", out), out
    champion, challenger = map(
        float, re.search(r"holdout MAE champion ([\d.]+) → challenger ([\d.]+)", out).groups()
    )  # type: ignore[union-attr]
    assert challenger < 0.6 * champion, out


def test_nothing_is_left_running(demo: tuple[Path, str]) -> None:
    workdir, _ = demo
    assert _left_behind(str(workdir)) == []


async def test_the_store_kept_the_lineage_and_the_rollout(demo: tuple[Path, str]) -> None:
    workdir, _ = demo
    settings = StoreSettings(port=0, data_dir=workdir / "data", log_level="WARNING")
    async with await start_store(settings) as store, aio.insecure_channel(store.address) as ch:
        stub = pb_grpc.StoreServiceStub(ch)
        versions = {
            v.version: v
            for v in (
                await stub.ListModelVersions(pb.ListModelVersionsRequest(model="bikes"))
            ).model_versions
        }
        assert versions["1"].status == pb.MODEL_STATUS_RETIRED
        v2 = versions["2"]
        assert v2.status == pb.MODEL_STATUS_SERVING
        assert v2.parent_version == "1" and v2.triggering_alert_id > 0
        assert v2.training_rows >= 300 and v2.family == "refit"
        assert v2.HasField("training_window_start") and v2.HasField("training_window_end")
        alerts = (await stub.ListAlerts(pb.ListAlertsRequest(model="bikes"))).alerts
        retrain = [a for a in alerts if any(t.action == "retrain" for t in a.targets)]
        assert [a.id for a in retrain] == [v2.triggering_alert_id]
        assert all(t.sink == "trainer" for a in retrain for t in a.targets if t.action == "retrain")
        rollouts = (await stub.ListRollouts(pb.ListRolloutsRequest(model="bikes"))).rollouts
        assert len(rollouts) == 1 and rollouts[0].to_version == "2"
        stats = (await stub.GetStats(pb.GetStatsRequest(model="bikes"))).models
        assert sum(m.predictions for m in stats) > 1000
