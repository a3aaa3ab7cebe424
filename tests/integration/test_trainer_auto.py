"""`retrain.window: auto` through a real store (fresh PostgreSQL) and a real trainer server on free
ports: the job asked by an alert waits for labelled rows after the change point, fits the
candidate windows and records which won; a feature that broke at the change ends the job as a
data fault, named, with nothing registered; a challenger that cannot win is retried while the
model stays RED and then the plan's notify sinks hear that retraining did not help."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from grpc import aio

from cyclone.models.convert import import_pipeline
from cyclone.models.registration import register
from cyclone.models.repository import PIPELINE_FILE, ModelRepository
from cyclone.server import CycloneServer
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.worlds import FEATURES, LABEL, World, champion_pipeline, stream
from plugins.alert_sinks import read_recorded
from services import launch
from services.store.db import uuid7
from services.store.main import StoreSettings
from services.trainer.jobs import stages
from services.trainer.main import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "world"
BEFORE = 3000


def plan_yaml(alerts: Path, attempts: int = 3, margin: float = 0.01, wait: str = "60s") -> str:
    return f"""
model: {MODEL}
metrics: [accuracy]
notify: [{{sink: record, config: {{path: "{alerts}"}}}}]
retrain: {{window: auto, min_rows: 200, fresh_rows: 800, wait: {wait}, attempts: {attempts},
          holdout: 0.25, resamples: 100, margin: {margin}}}
"""


@dataclass
class Stack:
    store: store_grpc.StoreServiceStub
    trainer: pb_grpc.TrainerServiceStub
    champion: Any
    alerts: Path
    clock: list[datetime]


async def _register(store: store_grpc.StoreServiceStub, repo: Path, world: World) -> Any:
    frame = world.rows(4000, -20_000, np.random.default_rng(world.seed))
    pipeline = champion_pipeline(frame)
    directory, _, _ = import_pipeline(
        pipeline, MODEL, repo, version="1", sample=frame, label_column=LABEL
    )
    joblib.dump(pipeline, directory / PIPELINE_FILE)
    await register(store, ModelRepository(repo).files(MODEL, "1"))  # registered and serving
    return pipeline


async def serve(stack: Stack, frame: pd.DataFrame) -> None:
    """Log `frame` as the champion's served predictions (1 ms apart, after the rows before)
    and label every row."""
    start = stack.clock[0]
    stack.clock[0] = start + timedelta(milliseconds=len(frame))
    ids = [str(uuid7(start + timedelta(milliseconds=i))) for i in range(len(frame))]
    answers = stack.champion.predict(frame[FEATURES])
    records = [
        store_pb.PredictionRecord(
            prediction_id=pid,
            model=MODEL,
            version="1",
            input_json=json.dumps({k: row[k] for k in FEATURES}).encode(),
            output_json=json.dumps({"label": str(answer)}).encode(),
        )
        for pid, row, answer in zip(ids, frame.to_dict("records"), answers, strict=True)
    ]

    async def batches() -> AsyncIterator[store_pb.LogPredictionsRequest]:
        yield store_pb.LogPredictionsRequest(records=records)

    await stack.store.LogPredictions(batches())
    await stack.store.AddLabels(
        store_pb.AddLabelsRequest(
            model=MODEL,
            labels=[
                store_pb.Label(prediction_id=pid, text=str(y))
                for pid, y in zip(ids, frame[LABEL], strict=True)
            ],
        )
    )


async def make_red(stack: Stack) -> None:
    await stack.store.RecordEvaluation(
        store_pb.RecordEvaluationRequest(
            model=MODEL, version="1", level="RED", reasons_json='["accuracy dropped"]'
        )
    )


@pytest.fixture
async def stack_of(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    monkeypatch.setattr(stages, "RETRY_BACKOFF_SECONDS", 0.2)
    monkeypatch.setattr(stages, "FRESH_POLL_SECONDS", 0.3)
    servers: list[CycloneServer] = []
    channels: list[aio.Channel] = []

    async def make(
        world: World, attempts: int = 3, margin: float = 0.01, wait: str = "60s"
    ) -> Stack:
        store_server = (
            await launch.start_store(
                StoreSettings(
                    port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
                )
            )
        ).server
        servers.append(store_server)
        address = f"127.0.0.1:{store_server.port}"
        channels.append(aio.insecure_channel(address))
        store = store_grpc.StoreServiceStub(channels[-1])
        champion = await _register(store, tmp_path / "models", world)
        alerts = tmp_path / "alerts.jsonl"
        await store.SavePlan(
            store_pb.SavePlanRequest(
                model=MODEL, plan_yaml=plan_yaml(alerts, attempts, margin, wait)
            )
        )
        trainer_server = (
            await launch.start_trainer(
                TrainerSettings(
                    port=0, store=address, model_repository=tmp_path / "models", log_level="WARNING"
                )
            )
        ).server
        servers.append(trainer_server)
        channels.append(aio.insecure_channel(f"127.0.0.1:{trainer_server.port}"))
        clock = [datetime.now(UTC) - timedelta(minutes=10)]
        return Stack(store, pb_grpc.TrainerServiceStub(channels[-1]), champion, alerts, clock)

    try:
        yield make
    finally:
        for server in reversed(servers):
            await server.stop(0)
        for channel in channels:
            await channel.close()


async def finished(stack: Stack, job_id: int, timeout: float = 90) -> tuple[pb.Job, list[str]]:
    stages: list[str] = []
    last = None
    async for event in stack.trainer.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout):
        last = event.job
        stages.append(event.job.stage)
    assert last is not None
    return last, stages


@pytest.mark.parametrize("seed", [0, 1])
async def test_alert_job_waits_for_the_new_world_and_fits_since_the_change(
    stack_of: Any, seed: int
) -> None:
    world = World("concept", seed)
    stack: Stack = await stack_of(world)
    rows = stream(world, BEFORE, 2000)
    await serve(stack, rows.iloc[: BEFORE + 300])  # the alert comes early: 300 rows after
    response = await stack.trainer.Retrain(
        pb.RetrainRequest(model=MODEL, alert_id=7, reason="accuracy dropped"), timeout=10
    )
    waiting = asyncio.create_task(finished(stack, response.job.id))
    for _ in range(100):
        job = (await stack.trainer.GetJob(pb.GetJobRequest(job_id=response.job.id))).job
        if job.stage.startswith("waiting for labels after the change point"):
            break
        await asyncio.sleep(0.1)
    assert job.stage.startswith("waiting for labels after the change point"), job.stage
    await serve(stack, rows.iloc[BEFORE + 300 :])
    job, _ = await waiting
    assert pb.JobState.Name(job.state) == "JOB_STATE_SUCCEEDED", job.message
    assert "window since_change" in job.decision and "change point" in job.decision
    mv = (
        await stack.store.GetModelVersion(
            store_pb.GetModelVersionRequest(model=MODEL, version=job.new_version)
        )
    ).model_version
    lineage = json.loads(mv.holdout_metrics_json)["window"]
    assert lineage["kind"] == "auto" and lineage["chosen"] == "since_change"
    assert abs(lineage["change_point"]["row"] - BEFORE) <= 60
    assert set(lineage["candidates"]) == {"since_change", "newest"}
    # Trained on the rows after the change, less the holdout (a quarter of them).
    fresh = 5000 - lineage["change_point"]["row"]
    assert mv.training_rows == fresh - round(fresh * 0.25)


async def test_a_broken_feature_is_a_data_fault_not_a_retrain(stack_of: Any) -> None:
    world = World("broken", 3)
    stack: Stack = await stack_of(world)
    await serve(stack, stream(world, BEFORE, 1500))
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=8), timeout=10)
    job, _ = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED", job.message
    assert "data fault" in job.message and "x1: stuck at 0" in job.message
    versions = await stack.store.ListModelVersions(store_pb.ListModelVersionsRequest(model=MODEL))
    assert [v.version for v in versions.model_versions] == ["1"]
    (alert,) = read_recorded(stack.alerts)
    assert "x1: stuck at 0" in alert.reasons[0] and alert.model == MODEL


async def test_new_values_are_learned_and_said_not_refused_as_a_fault(stack_of: Any) -> None:
    """A new world whose values were never seen (a region renamed into new codes, a feature on
    a new scale) is retrained on, not stopped as a data fault: only a column missing or stuck
    carries nothing to learn. The job's decision and the version's lineage name the new values."""
    world = World("concept", 5)
    stack: Stack = await stack_of(world)
    rows = stream(world, BEFORE, 1500)
    after = rows.index >= BEFORE
    rows.loc[after, "region"] = rows.loc[after, "region"] + "-2"
    rows.loc[after, "x4"] = rows.loc[after, "x4"] + 50.0
    await serve(stack, rows)
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=9), timeout=10)
    job, _ = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_SUCCEEDED", job.message
    assert "new values since the change" in job.decision, job.decision
    assert "region: 100% of values are categories never seen before" in job.decision
    assert "x4: 100% of values outside" in job.decision
    mv = (
        await stack.store.GetModelVersion(
            store_pb.GetModelVersionRequest(model=MODEL, version=job.new_version)
        )
    ).model_version
    novel = json.loads(mv.holdout_metrics_json)["window"]["novel_values"]
    assert [n.split(":")[0] for n in novel] == ["x4", "region"]
    assert not stack.alerts.exists()  # no fault told to the notify sinks


async def test_a_challenger_that_cannot_win_is_retried_while_red_then_notified(
    stack_of: Any,
) -> None:
    world = World("stable", 4)
    # A margin no challenger meets on coin flips: rejection is certain, the retries are tested.
    # No more rows come: the second attempt fits what is there once `wait` runs out.
    stack: Stack = await stack_of(world, attempts=2, margin=0.3, wait="3s")
    rows = stream(world, BEFORE, 1500)
    # After the change the labels are coin flips: the loss rises, and nothing can learn it.
    rng = np.random.default_rng(4)
    rows.loc[BEFORE:, LABEL] = rng.choice(["0", "1"], len(rows) - BEFORE)
    await serve(stack, rows)
    await make_red(stack)
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=9), timeout=10)
    job, stages = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_REJECTED", job.message
    assert job.message.startswith("retraining did not beat the champion after 2 attempts")
    assert any(s.startswith("attempt 2/2 at ") for s in stages), stages
    (alert,) = read_recorded(stack.alerts)
    assert alert.reasons[0].startswith("retraining did not beat the champion after 2 attempts")


async def test_a_rejected_challenger_is_not_retried_once_the_model_is_not_red(
    stack_of: Any,
) -> None:
    world = World("stable", 5)
    stack: Stack = await stack_of(world, margin=0.3)
    rows = stream(world, BEFORE, 1500)
    rows.loc[BEFORE:, LABEL] = np.random.default_rng(5).choice(["0", "1"], len(rows) - BEFORE)
    await serve(stack, rows)  # no RED evaluation recorded: the monitor does not see a problem
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=10), timeout=10)
    job, stages = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_REJECTED", job.message
    assert job.message.endswith("the model is no longer RED")
    assert not any(s.startswith("attempt 2") for s in stages)
    assert not stack.alerts.exists()


async def test_a_job_by_hand_does_not_wait_and_fits_the_whole_window_on_a_fresh_change(
    stack_of: Any,
) -> None:
    world = World("concept", 6)
    stack: Stack = await stack_of(world)
    await serve(stack, stream(world, BEFORE, 120))  # a change too recent to fit on alone
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job, stages = await finished(stack, response.job.id, timeout=60)
    assert not any(s.startswith("waiting for labels") for s in stages), stages
    assert pb.JobState.Name(job.state) in ("JOB_STATE_SUCCEEDED", "JOB_STATE_REJECTED")
    assert job.decision.startswith("window newest"), job.decision
    assert job.window.rows == BEFORE + 120


async def test_no_challenger_is_fitted_while_a_rollout_of_the_model_is_in_progress(
    stack_of: Any,
) -> None:
    world = World("concept", 7)
    stack: Stack = await stack_of(world)
    await serve(stack, stream(world, BEFORE, 1000))
    rollout = (
        await stack.store.CreateRollout(
            store_pb.CreateRolloutRequest(
                rollout=store_pb.RolloutRecord(
                    model=MODEL, to_version="1", strategy="canary", state="progressing"
                ),
                event=store_pb.RolloutEvent(state="progressing", decision="start", reason="test"),
            )
        )
    ).rollout
    # An alert that came while the answer to the last one is being rolled out.
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=11), timeout=10)
    job, stages = await finished(stack, response.job.id, timeout=30)
    assert pb.JobState.Name(job.state) == "JOB_STATE_CANCELLED", job.message
    assert job.message.startswith(f"rollout {rollout.id} of version 1 is in progress")
    assert "fit" not in stages
