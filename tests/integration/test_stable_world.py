"""The other half of the loop's promise: a model that is fine is left alone.

A stable world (the bike model's own world, only noise) runs for many evaluation periods through
a real store, monitor and trainer (in-process, `services/launch.py`; the monitor's retrain sink is
the trainer): it never goes RED and no retraining job is made. A retrain forced by hand on that
world ends REJECTED -- the challenger does not beat the champion -- and nothing is registered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from grpc import aio

from cyclone.models.convert import import_pipeline
from cyclone.models.registration import register
from cyclone.models.repository import ModelRepository
from cyclone.monitor.v1 import monitor_service_pb2 as monitor_pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc
from cyclone.plan import WindowSpec, default_plan, plan_to_yaml
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import BIKE_FEATURES, bike_frame, bike_pipeline
from services.launch import start_monitor, start_store, start_trainer
from services.monitor.main import MonitorSettings
from services.store.db import uuid7
from services.store.main import StoreSettings
from services.trainer.jobs import JobRunner, ServeImmediately, StoreJobGateway
from services.trainer.main import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "bike"
PERIODS = 10
ROWS_PER_PERIOD = 400
YEAR = 24 * 365


@dataclass
class World:
    store: store_grpc.StoreServiceStub
    monitor: monitor_grpc.MonitorServiceStub
    trainer: pb_grpc.TrainerServiceStub
    champion: Any
    repository: Path


def fresh_rows(seed: int) -> pd.DataFrame:
    """Hours drawn from a whole year of the same world (new noise each time), in random order,
    so every period sees every season, as the champion's training year did."""
    return bike_frame(YEAR, seed=seed).sample(ROWS_PER_PERIOD, random_state=seed)


@pytest.fixture
async def world(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    repository = tmp_path / "models"
    champion = bike_pipeline(bike_frame(YEAR, seed=0))
    # The baseline (evaluation.json) and the drift reference come from rows the champion has
    # not seen: its in-sample error would make honest fresh data look like a drop.
    sample = bike_frame(YEAR, seed=100).sample(2000, random_state=0)
    import_pipeline(champion, MODEL, repository, version="1", sample=sample, label_column="rentals")
    log = {"log_level": "WARNING", "data_dir": tmp_path}
    async with await start_store(
        StoreSettings(port=0, database_url=fresh_database_url, pool_min_size=1, **log)
    ) as store:
        trainer_settings = TrainerSettings(
            port=0, store=store.address, model_repository=repository, **log
        )
        async with await start_trainer(trainer_settings) as trainer:
            monitor_settings = MonitorSettings(
                port=0, store=store.address, trainer=trainer.address, alert_interval=0.1, **log
            )
            async with (
                await start_monitor(monitor_settings, schedule=False) as monitor,
                aio.insecure_channel(store.address) as store_channel,
                aio.insecure_channel(monitor.address) as monitor_channel,
                aio.insecure_channel(trainer.address) as trainer_channel,
            ):
                stub = store_grpc.StoreServiceStub(store_channel)
                assert await register(stub, ModelRepository(repository).files(MODEL, "1"))
                yield World(
                    stub,
                    monitor_grpc.MonitorServiceStub(monitor_channel),
                    pb_grpc.TrainerServiceStub(trainer_channel),
                    champion,
                    repository,
                )


class Feed:
    """Serves rows as the champion would (its real predictions), then labels them."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.clock = datetime.now(UTC) - timedelta(minutes=30)

    async def send(self, frame: pd.DataFrame) -> None:
        predictions = self.world.champion.predict(frame[BIKE_FEATURES])
        ids = []
        records = []
        for features, value in zip(
            frame[BIKE_FEATURES].to_dict("records"), predictions, strict=True
        ):
            self.clock += timedelta(milliseconds=5)
            ids.append(str(uuid7(self.clock)))
            records.append(
                store_pb.PredictionRecord(
                    prediction_id=ids[-1],
                    model=MODEL,
                    version="1",
                    input_json=json.dumps(features).encode(),
                    output_json=json.dumps({"value": float(value)}).encode(),
                    latency_ms=2.0,
                )
            )

        async def batches() -> AsyncIterator[store_pb.LogPredictionsRequest]:
            yield store_pb.LogPredictionsRequest(records=records)

        logged = await self.world.store.LogPredictions(batches(), timeout=30)
        assert logged.inserted == len(frame)
        await self.world.store.AddLabels(
            store_pb.AddLabelsRequest(
                model=MODEL,
                labels=[
                    store_pb.Label(prediction_id=pid, number=float(y))
                    for pid, y in zip(ids, frame["rentals"], strict=True)
                ],
            ),
            timeout=30,
        )


async def test_stable_world_never_retrains_and_a_forced_retrain_is_rejected(world: World) -> None:
    # Each evaluation looks at the newest period's rows only.
    plan = default_plan(MODEL, "regression")
    plan = dataclasses.replace(
        plan, window=WindowSpec("sliding", None, ROWS_PER_PERIOD, ROWS_PER_PERIOD // 2)
    )
    await world.monitor.SetPlan(
        monitor_pb.SetPlanRequest(model=MODEL, plan_yaml=plan_to_yaml(plan)), timeout=10
    )
    feed = Feed(world)
    levels = []
    for period in range(PERIODS):
        await feed.send(fresh_rows(seed=1 + period))
        evaluated = await world.monitor.EvaluateNow(
            monitor_pb.EvaluateNowRequest(model=MODEL), timeout=30
        )
        status = evaluated.status
        assert status.labelled_rows == ROWS_PER_PERIOD, status
        levels.append(monitor_pb.Level.Name(status.level))
        assert status.level != monitor_pb.LEVEL_RED, (period, list(status.reasons))
        # The test can fail: the rmse trigger is live and measured against the baseline.
        assert any(m.name == "rmse" for m in status.metrics), status.metrics

    assert len(levels) == PERIODS and "LEVEL_UNSPECIFIED" not in levels
    alerts = await world.monitor.ListAlerts(monitor_pb.ListAlertsRequest(model=MODEL), timeout=10)
    assert not [a for a in alerts.alerts if a.action == "retrain"], alerts
    jobs = await world.trainer.ListJobs(pb.ListJobsRequest(model=MODEL), timeout=10)
    assert list(jobs.jobs) == []

    # A retrain by hand on the same world: the challenger is not better, so it is not promoted.
    started = await world.trainer.Retrain(
        pb.RetrainRequest(model=MODEL, reason="by hand on a stable world"), timeout=10
    )
    job = started.job
    async for event in world.trainer.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120):
        job = event.job
    assert pb.JobState.Name(job.state) == "JOB_STATE_REJECTED", job.message
    assert job.window.rows == PERIODS * ROWS_PER_PERIOD
    assert "keep the champion" in job.decision and job.new_version == ""
    assert job.challenger_metrics and job.champion_metrics
    versions = await world.store.ListModelVersions(
        store_pb.ListModelVersionsRequest(model=MODEL), timeout=10
    )
    assert [(v.version, v.status) for v in versions.model_versions] == [
        ("1", store_pb.MODEL_STATUS_SERVING)
    ]
    assert sorted(p.name for p in (world.repository / MODEL).iterdir()) == ["1"]


async def test_a_retrain_asked_while_the_trainer_starts_waits_for_it(world: World) -> None:
    # The server takes calls while its start-up hooks (Envoy, revisions) still run; a job
    # queued then must wait for the worker pool, not fail with "not started".
    runner = JobRunner(
        StoreJobGateway(world.store, world.repository),
        world.repository,
        rollout=ServeImmediately(world.store),
    )
    queued, created = await runner.retrain(MODEL, reason="during start-up")
    assert created
    await asyncio.sleep(0.3)
    assert (await runner.get(queued.id)).state == "queued"
    await runner.start()
    try:
        states = [job async for job in runner.watch(queued.id)]
    finally:
        await runner.stop()
    # No labelled rows were sent: the job ran, and ended for that reason.
    assert states[-1].state == "not_enough_data", states[-1].message
