"""The store's training-job RPCs and the one-transaction registration of retrained versions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


@pytest.fixture
async def stub(fresh_database_url: str) -> AsyncIterator[pb_grpc.StoreServiceStub]:
    server = (
        await start_store(
            StoreSettings(
                port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.StoreServiceStub(channel)
    finally:
        await server.stop(0)


async def fails(call: Any, code: grpc.StatusCode, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert (info.value.details() or "").startswith(field), info.value.details()


def version(v: str = "2", **extra: Any) -> pb.ModelVersion:
    fields: dict[str, Any] = {"sha256": "abc", "task": "regression", **extra}
    return pb.ModelVersion(model="m", version=v, **fields)


async def test_job_life_cycle_and_idempotent_create(stub: pb_grpc.StoreServiceStub) -> None:
    first = await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", alert_id=5))
    again = await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", alert_id=5))
    assert first.created and not again.created and again.job.id == first.job.id
    job_id = first.job.id
    running = await stub.UpdateTrainingJob(
        pb.UpdateTrainingJobRequest(
            job_id=job_id,
            state="running",
            stage="fit",
            window_rows=10,
            champion_metrics_json='{"accuracy": 0.8}',
            expected_state="queued",
        )
    )
    assert running.job.state == "running" and running.job.window_rows == 10
    assert json.loads(running.job.champion_metrics_json) == {"accuracy": 0.8}
    registered = await stub.RegisterTrainedVersion(
        pb.RegisterTrainedVersionRequest(
            job_id=job_id,
            model_version=version(
                parent_version="1",
                triggering_alert_id=5,
                training_rows=8,
                family="refit",
                hyperparameters_json='{"alpha": 1}',
                holdout_metrics_json='{"champion": {"rmse": 2}, "challenger": {"rmse": 1}}',
            ),
        )
    )
    assert registered.job.new_version == "2"
    got = (
        await stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version="2"))
    ).model_version
    assert (got.training_rows, got.family, got.parent_version) == (8, "refit", "1")
    assert json.loads(got.hyperparameters_json) == {"alpha": 1}
    assert got.status == pb.MODEL_STATUS_STAGED
    done = await stub.UpdateTrainingJob(
        pb.UpdateTrainingJobRequest(job_id=job_id, state="succeeded", stage="done")
    )
    assert done.job.state == "succeeded"
    # An ended job no longer changes.
    await fails(
        stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=job_id, state="failed")),
        Code.FAILED_PRECONDITION,
        "job_id",
    )
    listed = await stub.ListTrainingJobs(pb.ListTrainingJobsRequest(model="m", state="succeeded"))
    assert [j.id for j in listed.jobs] == [job_id]


async def test_registering_for_a_job_that_is_not_running_changes_nothing(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    job = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m"))).job
    await fails(
        stub.RegisterTrainedVersion(
            pb.RegisterTrainedVersionRequest(job_id=job.id, model_version=version())
        ),
        Code.FAILED_PRECONDITION,
        "job_id",
    )
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="m"))
    assert list(listed.model_versions) == []


async def test_a_duplicate_version_rolls_the_registration_back(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    await stub.RegisterModelVersion(pb.RegisterModelVersionRequest(model_version=version()))
    job = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m"))).job
    await stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=job.id, state="running"))
    await fails(
        stub.RegisterTrainedVersion(
            pb.RegisterTrainedVersionRequest(job_id=job.id, model_version=version())
        ),
        Code.INVALID_ARGUMENT,
        "model_version",
    )
    after = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.id))).job
    assert after.new_version == ""


async def _until_expired(stub: pb_grpc.StoreServiceStub, *jobs: pb.TrainingJob) -> None:
    """Sleep past the latest of the jobs' leases (as the store recorded them)."""
    latest = max(j.lease_expires_at.ToDatetime(tzinfo=UTC) for j in jobs)
    await asyncio.sleep(max((latest - datetime.now(UTC)).total_seconds(), 0) + 0.05)


async def test_orphaned_jobs_of_other_owners_fail_once_their_lease_expired(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    old = (
        await stub.CreateTrainingJob(
            pb.CreateTrainingJobRequest(model="m", owner="a", lease_seconds=0.3)
        )
    ).job
    mine = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", owner="b"))).job
    live = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", owner="c"))).job
    # "c"'s lease (the default, a minute) still runs: only "a"'s job is orphaned.
    await _until_expired(stub, old)
    failed = await stub.FailOrphanedTrainingJobs(
        pb.FailOrphanedTrainingJobsRequest(owner="b", reason="restarted")
    )
    assert [j.id for j in failed.jobs] == [old.id]
    assert failed.jobs[0].state == "failed" and failed.jobs[0].message == "restarted"
    for job_id in (mine.id, live.id):
        still = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job_id))).job
        assert still.state == "queued"


async def test_a_heartbeat_renews_the_owners_unfinished_jobs_only(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    create = pb.CreateTrainingJobRequest(model="m", owner="a", lease_seconds=1)
    first = (await stub.CreateTrainingJob(create)).job
    ended = (await stub.CreateTrainingJob(create)).job
    other = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", owner="b"))).job
    await stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=ended.id, state="failed"))
    beat = await stub.HeartbeatTrainingJobs(
        pb.HeartbeatTrainingJobsRequest(owner="a", lease_seconds=120)
    )
    assert list(beat.job_ids) == [first.id]
    renewed = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=first.id))).job
    lease = renewed.lease_expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=100) < lease <= timedelta(seconds=120)
    untouched = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=other.id))).job
    assert untouched.lease_expires_at == other.lease_expires_at


async def test_claims_take_over_expired_jobs_each_exactly_once(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    short = pb.CreateTrainingJobRequest(model="m", owner="gone", lease_seconds=0.3)
    queued = [(await stub.CreateTrainingJob(short)).job for _ in range(12)]
    running = (await stub.CreateTrainingJob(short)).job
    await stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=running.id, state="running"))
    alive = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", owner="x"))).job
    # Before the lease ran out nothing is taken over.
    early = await stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest(owner="b"))
    assert list(early.claimed) == [] and list(early.failed) == []
    await _until_expired(stub, *queued, running)
    first, second = await asyncio.gather(
        stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest(owner="b", lease_seconds=30)),
        stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest(owner="c", lease_seconds=30)),
    )
    by_b = {j.id for j in first.claimed}
    by_c = {j.id for j in second.claimed}
    assert not by_b & by_c
    assert by_b | by_c == {j.id for j in queued}
    assert all(j.owner == "b" and j.state == "queued" for j in first.claimed)
    failed = [*first.failed, *second.failed]
    assert [j.id for j in failed] == [running.id]
    assert failed[0].state == "failed" and "lease" in failed[0].message
    # The old owner can no longer write to a job taken from it; the new one can.
    taken = queued[0].id
    new_owner = "b" if taken in by_b else "c"
    await fails(
        stub.UpdateTrainingJob(
            pb.UpdateTrainingJobRequest(
                job_id=taken, state="running", expected_state="queued", expected_owner="gone"
            )
        ),
        Code.FAILED_PRECONDITION,
        "job_id",
    )
    started = await stub.UpdateTrainingJob(
        pb.UpdateTrainingJobRequest(
            job_id=taken, state="running", expected_state="queued", expected_owner=new_owner
        )
    )
    assert started.job.state == "running"
    still = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=alive.id))).job
    assert still.state == "queued" and still.owner == "x"


async def test_training_rpcs_bad_input(stub: pb_grpc.StoreServiceStub) -> None:
    job = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", alert_id=9))).job
    cases = [
        (
            stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="")),
            Code.INVALID_ARGUMENT,
            "model",
        ),
        (
            stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="a b")),
            Code.INVALID_ARGUMENT,
            "model",
        ),
        (
            stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", alert_id=-1)),
            Code.INVALID_ARGUMENT,
            "alert_id",
        ),
        (
            stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="other", alert_id=9)),
            Code.INVALID_ARGUMENT,
            "alert_id",
        ),
        (
            stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=0)),
            Code.INVALID_ARGUMENT,
            "job_id",
        ),
        (
            stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=999, stage="x")),
            Code.NOT_FOUND,
            "job_id",
        ),
        (
            stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=job.id, state="done")),
            Code.INVALID_ARGUMENT,
            "state",
        ),
        (
            stub.UpdateTrainingJob(
                pb.UpdateTrainingJobRequest(job_id=job.id, expected_state="paused")
            ),
            Code.INVALID_ARGUMENT,
            "expected_state",
        ),
        (
            stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=job.id, window_rows=-1)),
            Code.INVALID_ARGUMENT,
            "window_rows",
        ),
        (
            stub.UpdateTrainingJob(
                pb.UpdateTrainingJobRequest(job_id=job.id, champion_metrics_json='{"a": NaN}')
            ),
            Code.INVALID_ARGUMENT,
            "champion_metrics_json",
        ),
        (
            stub.UpdateTrainingJob(
                pb.UpdateTrainingJobRequest(job_id=job.id, challenger_metrics_json='{"a": "x"}')
            ),
            Code.INVALID_ARGUMENT,
            "challenger_metrics_json",
        ),
        (
            stub.UpdateTrainingJob(
                pb.UpdateTrainingJobRequest(
                    job_id=job.id, state="running", expected_state="running"
                )
            ),
            Code.FAILED_PRECONDITION,
            "job_id",
        ),
        (stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=-3)), Code.INVALID_ARGUMENT, "job_id"),
        (stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=999)), Code.NOT_FOUND, "job_id"),
        (
            stub.ListTrainingJobs(pb.ListTrainingJobsRequest(state="x")),
            Code.INVALID_ARGUMENT,
            "state",
        ),
        (
            stub.ListTrainingJobs(pb.ListTrainingJobsRequest(limit=1001)),
            Code.INVALID_ARGUMENT,
            "limit",
        ),
        (
            stub.FailOrphanedTrainingJobs(pb.FailOrphanedTrainingJobsRequest()),
            Code.INVALID_ARGUMENT,
            "owner",
        ),
        (
            stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m", lease_seconds=-1)),
            Code.INVALID_ARGUMENT,
            "lease_seconds",
        ),
        (
            stub.HeartbeatTrainingJobs(pb.HeartbeatTrainingJobsRequest()),
            Code.INVALID_ARGUMENT,
            "owner",
        ),
        (
            stub.HeartbeatTrainingJobs(
                pb.HeartbeatTrainingJobsRequest(owner="a", lease_seconds=3601)
            ),
            Code.INVALID_ARGUMENT,
            "lease_seconds",
        ),
        (
            stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest()),
            Code.INVALID_ARGUMENT,
            "owner",
        ),
        (
            stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest(owner="a", limit=1001)),
            Code.INVALID_ARGUMENT,
            "limit",
        ),
        (
            stub.ClaimTrainingJobs(pb.ClaimTrainingJobsRequest(owner="a", lease_seconds=-2)),
            Code.INVALID_ARGUMENT,
            "lease_seconds",
        ),
        (
            stub.RegisterTrainedVersion(pb.RegisterTrainedVersionRequest(job_id=job.id)),
            Code.INVALID_ARGUMENT,
            "model_version",
        ),
        (
            stub.RegisterTrainedVersion(
                pb.RegisterTrainedVersionRequest(job_id=job.id, model_version=version(sha256=""))
            ),
            Code.INVALID_ARGUMENT,
            "model_version.sha256",
        ),
        (
            stub.RegisterTrainedVersion(
                pb.RegisterTrainedVersionRequest(
                    job_id=job.id, model_version=version(hyperparameters_json="[1]")
                )
            ),
            Code.INVALID_ARGUMENT,
            "model_version.hyperparameters_json",
        ),
        (
            stub.RegisterTrainedVersion(
                pb.RegisterTrainedVersionRequest(
                    job_id=job.id,
                    model_version=pb.ModelVersion(model="other", version="2", sha256="a"),
                )
            ),
            Code.INVALID_ARGUMENT,
            "model_version.model",
        ),
        (
            stub.RegisterTrainedVersion(
                pb.RegisterTrainedVersionRequest(job_id=999, model_version=version())
            ),
            Code.NOT_FOUND,
            "job_id",
        ),
    ]
    for call, code, field in cases:
        await fails(call, code, field)


async def test_a_retrained_version_is_checked_like_any_version(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    """RegisterTrainedVersion checks what RegisterModelVersion checks (a task it knows), and
    its metrics JSON by the store's one policy; nothing of a refused call is written."""
    job = (await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(model="m"))).job
    await stub.UpdateTrainingJob(pb.UpdateTrainingJobRequest(job_id=job.id, state="running"))
    await fails(
        stub.RegisterTrainedVersion(
            pb.RegisterTrainedVersionRequest(job_id=job.id, model_version=version(task="ranking"))
        ),
        Code.INVALID_ARGUMENT,
        "model_version.task: expected one of regression, classification, got 'ranking'",
    )
    await fails(
        stub.UpdateTrainingJob(
            pb.UpdateTrainingJobRequest(job_id=job.id, champion_metrics_json='{"auc": 1e999}')
        ),
        Code.INVALID_ARGUMENT,
        "champion_metrics_json: not valid JSON (1e999 is out of range for a double)",
    )
    await fails(
        stub.GetModelVersion(pb.GetModelVersionRequest(model="m", version="2")),
        Code.NOT_FOUND,
        "version",
    )
    got = (await stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.id))).job
    assert got.new_version == "" and got.champion_metrics_json == ""
