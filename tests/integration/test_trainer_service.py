"""The trainer service with a real store (fresh PostgreSQL) and a real trainer server, in-process,
on free ports. Data goes in through the store's own RPCs (LogPredictions + AddLabels)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import joblib
import pandas as pd
import pytest
from grpc import aio

from cyclone.models.convert import import_pipeline
from cyclone.models.repository import EVALUATION_FILE, PIPELINE_FILE, REFERENCE_FILE
from cyclone.server import CycloneServer
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import CREDIT_FEATURES, credit_frame, credit_pipeline
from services.launch import start_store, start_trainer
from services.store.db import uuid7
from services.store.main import StoreSettings
from services.trainer.main import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "credit"
PLAN = """
model: credit
metrics: [accuracy]
retrain: {window: sliding, rows: 3000, min_rows: 300, holdout: 0.3, margin: 0.01, resamples: 200}
"""


@dataclass
class Stack:
    store: store_grpc.StoreServiceStub
    trainer: pb_grpc.TrainerServiceStub
    repo: Path
    store_address: str
    trainer_address: str


async def _register_champion(store: store_grpc.StoreServiceStub, repo: Path) -> None:
    frame = credit_frame(2000, seed=0)
    pipeline = credit_pipeline(frame)
    directory, schema, _ = import_pipeline(
        pipeline, MODEL, repo, version="1", sample=frame, label_column="defaulted"
    )
    joblib.dump(pipeline, directory / PIPELINE_FILE)
    await store.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=store_pb.ModelVersion(
                model=MODEL,
                version="1",
                task=schema.task,
                sha256=str(schema.extra["sha256"]),
                artifact_uri=str(directory),
                schema_json=json.dumps(schema.to_dict()),
                reference_profile_json=(directory / REFERENCE_FILE).read_text(),
                evaluation_json=(directory / EVALUATION_FILE).read_text(),
            )
        )
    )
    await store.SetModelStatus(
        store_pb.SetModelStatusRequest(
            model=MODEL, version="1", status=store_pb.MODEL_STATUS_SERVING
        )
    )


async def send_labelled(store: store_grpc.StoreServiceStub, frame: pd.DataFrame) -> None:
    """Log `frame` as served predictions (oldest first, 1 ms apart) and label every row."""
    start = datetime.now(UTC) - timedelta(milliseconds=len(frame) + 1000)
    ids = [str(uuid7(start + timedelta(milliseconds=i))) for i in range(len(frame))]
    records = [
        store_pb.PredictionRecord(
            prediction_id=pid,
            model=MODEL,
            version="1",
            input_json=json.dumps({k: row[k] for k in CREDIT_FEATURES}).encode(),
            output_json=json.dumps({"label": "0", "probabilities": {"0": 0.5, "1": 0.5}}).encode(),
        )
        for pid, row in zip(ids, frame.to_dict("records"), strict=True)
    ]

    async def batches() -> AsyncIterator[store_pb.LogPredictionsRequest]:
        yield store_pb.LogPredictionsRequest(records=records)

    await store.LogPredictions(batches())
    await store.AddLabels(
        store_pb.AddLabelsRequest(
            model=MODEL,
            labels=[
                store_pb.Label(prediction_id=pid, text=str(y))
                for pid, y in zip(ids, frame["defaulted"], strict=True)
            ],
        )
    )


@pytest.fixture
async def stack(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    store_server = (
        await start_store(
            StoreSettings(
                port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    servers: list[CycloneServer] = [store_server]
    address = f"127.0.0.1:{store_server.port}"
    repo = tmp_path / "models"
    channel = aio.insecure_channel(address)
    try:
        store = store_grpc.StoreServiceStub(channel)
        await _register_champion(store, repo)
        await store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=PLAN))
        trainer_server = (
            await start_trainer(
                TrainerSettings(port=0, store=address, model_repository=repo, log_level="WARNING")
            )
        ).server
        servers.append(trainer_server)
        trainer_address = f"127.0.0.1:{trainer_server.port}"
        trainer_channel = aio.insecure_channel(trainer_address)
        yield Stack(
            store, pb_grpc.TrainerServiceStub(trainer_channel), repo, address, trainer_address
        )
        await trainer_channel.close()
    finally:
        for server in reversed(servers):
            await server.stop(0)
        await channel.close()


async def finished(stack: Stack, job_id: int) -> pb.Job:
    last = None
    async for event in stack.trainer.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=120):
        last = event.job
    assert last is not None
    return last


async def test_concept_shift_challenger_wins_and_is_registered_with_lineage(stack: Stack) -> None:
    await send_labelled(stack.store, credit_frame(2000, seed=5, shift=1.5))
    response = await stack.trainer.Retrain(
        pb.RetrainRequest(model=MODEL, alert_id=0, reason="test"), timeout=10
    )
    job = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_SUCCEEDED", job.message
    assert job.new_version == "2" and job.champion_version == "1"
    assert job.challenger_metrics["accuracy"] > job.champion_metrics["accuracy"]
    assert job.window.rows == 2000 and job.window.holdout_rows == 600
    mv = (
        await stack.store.GetModelVersion(store_pb.GetModelVersionRequest(model=MODEL, version="2"))
    ).model_version
    assert mv.status == store_pb.MODEL_STATUS_SERVING
    assert mv.parent_version == "1" and mv.family == "refit" and mv.training_rows == 1400
    assert mv.training_window_start.seconds > 0 and mv.sha256
    holdout = json.loads(mv.holdout_metrics_json)
    assert holdout["challenger"]["accuracy"] > holdout["champion"]["accuracy"]
    # refit keeps the champion's hyperparameters (LogisticRegression's C among them)
    assert any(key.endswith("__C") for key in json.loads(mv.hyperparameters_json))
    assert (stack.repo / MODEL / "2" / "model.onnx").exists()
    assert (stack.repo / MODEL / "2" / PIPELINE_FILE).exists()


async def test_stable_world_challenger_is_rejected_and_nothing_registered(stack: Stack) -> None:
    await send_labelled(stack.store, credit_frame(2000, seed=6))
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_REJECTED", job.message
    assert "keep the champion" in job.decision and job.new_version == ""
    versions = await stack.store.ListModelVersions(store_pb.ListModelVersionsRequest(model=MODEL))
    assert [v.version for v in versions.model_versions] == ["1"]
    assert sorted(p.name for p in (stack.repo / MODEL).iterdir()) == ["1"]


async def test_retrain_is_idempotent_per_alert(stack: Stack) -> None:
    first = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=42), timeout=10)
    again = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=42), timeout=10)
    assert first.created and not again.created
    assert again.job.id == first.job.id
    other = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=43), timeout=10)
    assert other.created and other.job.id != first.job.id


async def test_too_few_rows_ends_not_enough_data(stack: Stack) -> None:
    await send_labelled(stack.store, credit_frame(100, seed=7))
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_NOT_ENOUGH_DATA"
    assert "100 labelled rows" in job.message and "min_rows is 300" in job.message
    versions = await stack.store.ListModelVersions(store_pb.ListModelVersionsRequest(model=MODEL))
    assert len(versions.model_versions) == 1


async def test_one_class_window_fails_and_registers_nothing(stack: Stack) -> None:
    frame = credit_frame(600, seed=8)
    frame["defaulted"] = 0
    await send_labelled(stack.store, frame)
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED"
    assert "one class only" in job.message


async def test_family_that_fails_conversion_fails_the_job(stack: Stack) -> None:
    await stack.store.SavePlan(
        store_pb.SavePlanRequest(
            model=MODEL,
            plan_yaml=PLAN.replace("resamples: 200", "resamples: 200, family: no_such_family"),
        )
    )
    await send_labelled(stack.store, credit_frame(600, seed=9, shift=1.5))
    response = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(stack, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED"
    assert "retrain.family" in job.message
    serving = await stack.store.GetModelVersion(store_pb.GetModelVersionRequest(model=MODEL))
    assert serving.model_version.version == "1"


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.RetrainRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.RetrainRequest(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (pb.RetrainRequest(model=MODEL, alert_id=-1), grpc.StatusCode.INVALID_ARGUMENT, "alert_id"),
    ],
)
async def test_retrain_bad_input(
    stack: Stack, request_: pb.RetrainRequest, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await stack.trainer.Retrain(request_, timeout=10)
    assert info.value.code() == code
    assert (info.value.details() or "").startswith(field)


async def test_job_rpcs_bad_input_and_rollouts_without_a_router(stack: Stack) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await stack.trainer.GetJob(pb.GetJobRequest(job_id=0), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as info:
        await stack.trainer.GetJob(pb.GetJobRequest(job_id=999), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as info:
        await stack.trainer.ListJobs(pb.ListJobsRequest(limit=5000), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call, code in (
        (stack.trainer.CancelJob(pb.CancelJobRequest(job_id=0)), grpc.StatusCode.INVALID_ARGUMENT),
        (stack.trainer.CancelJob(pb.CancelJobRequest(job_id=999)), grpc.StatusCode.NOT_FOUND),
        (stack.trainer.ListJobs(pb.ListJobsRequest(state=42)), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(aio.AioRpcError) as info:
            await call
        assert info.value.code() == code, info.value.details()
    for job_id, code in ((0, grpc.StatusCode.INVALID_ARGUMENT), (999, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(aio.AioRpcError) as info:
            async for _ in stack.trainer.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10):
                pass
        assert info.value.code() == code, info.value.details()
        assert "job" in (info.value.details() or "")
    with pytest.raises(aio.AioRpcError) as info:
        await stack.trainer.Rollout(pb.RolloutRequest(model=MODEL, version="1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "router" in (info.value.details() or "")


async def test_cancel_queued_job_never_runs(stack: Stack) -> None:
    await send_labelled(stack.store, credit_frame(600, seed=10, shift=1.5))
    first = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=1), timeout=10)
    second = await stack.trainer.Retrain(pb.RetrainRequest(model=MODEL, alert_id=2), timeout=10)
    cancelled = await stack.trainer.CancelJob(pb.CancelJobRequest(job_id=second.job.id), timeout=10)
    assert pb.JobState.Name(cancelled.job.state) == "JOB_STATE_CANCELLED"
    await finished(stack, first.job.id)
    after = await stack.trainer.GetJob(pb.GetJobRequest(job_id=second.job.id), timeout=10)
    assert pb.JobState.Name(after.job.state) == "JOB_STATE_CANCELLED"
    assert not after.job.HasField("started_at")
    listed = await stack.trainer.ListJobs(
        pb.ListJobsRequest(model=MODEL, state=pb.JOB_STATE_CANCELLED), timeout=10
    )
    assert [j.id for j in listed.jobs] == [second.job.id]


async def test_restarted_trainer_fails_jobs_left_running(stack: Stack) -> None:
    import asyncio

    created = await stack.store.CreateTrainingJob(
        store_pb.CreateTrainingJobRequest(model=MODEL, owner="old-trainer", lease_seconds=0.3)
    )
    await stack.store.UpdateTrainingJob(
        store_pb.UpdateTrainingJobRequest(job_id=created.job.id, state="running")
    )
    # The old process stopped renewing its lease: once it ran out, the new one takes over.
    expires = created.job.lease_expires_at.ToDatetime(tzinfo=UTC)
    await asyncio.sleep(max((expires - datetime.now(UTC)).total_seconds(), 0) + 0.05)
    server = (
        await start_trainer(
            TrainerSettings(port=0, store=stack.store_address, model_repository=stack.repo)
        )
    ).server
    try:
        job = (
            await stack.store.GetTrainingJob(store_pb.GetTrainingJobRequest(job_id=created.job.id))
        ).job
        assert job.state == "failed" and "restarted" in job.message
    finally:
        await server.stop(0)


async def test_trainer_alert_sink_retrains_once_per_alert(stack: Stack, tmp_path: Path) -> None:
    import asyncio

    from cyclone.plugin_api import Alert
    from plugins.alert_sinks import deliver_trainer

    trainer_address = stack.trainer_address
    alert = Alert(
        "77", MODEL, "1", "RED", "GREEN", ["accuracy dropped"], ["retrain"], datetime.now(UTC)
    )
    await asyncio.to_thread(deliver_trainer, alert, {"address": trainer_address})
    await asyncio.to_thread(deliver_trainer, alert, {"address": trainer_address})
    jobs = await stack.trainer.ListJobs(pb.ListJobsRequest(model=MODEL), timeout=10)
    assert [(j.alert_id, j.reason) for j in jobs.jobs] == [(77, "accuracy dropped")]


async def test_trainer_alert_sink_raises_when_the_trainer_is_down() -> None:
    import asyncio

    from cyclone.plugin_api import Alert
    from plugins.alert_sinks import deliver_trainer

    alert = Alert("78", MODEL, "1", "RED", "GREEN", [], ["retrain"], datetime.now(UTC))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(grpc.RpcError):
        await asyncio.to_thread(deliver_trainer, alert, {"address": dead, "timeout": 2})


async def test_cli_retrain_and_jobs(stack: Stack) -> None:
    import asyncio

    from typer.testing import CliRunner

    from cyclone_app.cli import app

    await send_labelled(stack.store, credit_frame(100, seed=11))
    runner = CliRunner()
    args = ["--trainer", stack.trainer_address]
    result = await asyncio.to_thread(runner.invoke, app, ["retrain", MODEL, *args])
    assert result.exit_code == 0, result.output
    assert "not_enough_data" in result.output
    listed = await asyncio.to_thread(runner.invoke, app, ["jobs", *args])
    assert listed.exit_code == 0 and f"{MODEL} not_enough_data" in listed.output
    unknown = await asyncio.to_thread(runner.invoke, app, ["retrain", "nope", *args])
    assert unknown.exit_code != 0 and "model: 'nope' is not registered" in unknown.output


async def test_run_job_file_runs_one_queued_job_and_exits(stack: Stack, tmp_path: Path) -> None:
    """What a Nomad-dispatched batch job does: `cyclone serve trainer --run-job-file F`."""
    import asyncio
    import subprocess
    import sys

    await send_labelled(stack.store, credit_frame(2000, seed=6, shift=1.5))
    queued = await stack.store.CreateTrainingJob(
        store_pb.CreateTrainingJobRequest(model=MODEL, owner="nomad-dispatcher", reason="dispatch")
    )
    job_file = tmp_path / "job-id"
    job_file.write_text(f"{queued.job.id}\n")

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable, "-m", "cyclone_app", "serve", "trainer", "--store", stack.store_address,
                "--model-repository", str(stack.repo), "--run-job-file", str(path),
            ],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    done = await asyncio.to_thread(run, job_file)
    assert done.returncode == 0, done.stdout + done.stderr
    job = (
        await stack.store.GetTrainingJob(store_pb.GetTrainingJobRequest(job_id=queued.job.id))
    ).job
    assert job.state == "succeeded" and job.new_version == "2", job.message
    # A second run finds the job ended and leaves it as it is.
    again = await asyncio.to_thread(run, job_file)
    assert again.returncode == 0
    # A file without a job id is refused, naming the setting.
    bad = tmp_path / "bad"
    bad.write_text("not-a-number")
    refused = await asyncio.to_thread(run, bad)
    assert refused.returncode != 0 and "run_job_file" in refused.stderr
