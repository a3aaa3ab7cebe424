"""Several trainers over one real store (issue 22): each job is claimed and run by exactly one
trainer, and a trainer's jobs are taken from it only once its lease ran out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from grpc import aio

from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone_app.examples import credit_frame
from services.launch import start_store
from services.store.main import StoreSettings
from services.trainer.jobs import (
    Claimed,
    Job,
    JobRunner,
    ProcessWorker,
    ServeImmediately,
    StoreJobGateway,
)
from tests.integration.test_trainer_service import MODEL, _register_champion, send_labelled
from tests.support import eventually

pytestmark = pytest.mark.integration

SLIDING = """
model: credit
metrics: [accuracy]
retrain: {window: sliding, rows: 3000, min_rows: 300, holdout: 0.3, margin: 0.01, resamples: 200}
"""
# A job that waits (running, stage "waiting for labels") for rows predicted after it.
WAITING = """
model: credit
metrics: [accuracy]
retrain: {window: sliding, rows: 3000, min_rows: 300, since_alert: true, wait: 10m}
"""
LEASE = 3.0
BEAT = 0.2


class CountingGateway(StoreJobGateway):
    """The real gateway, noting when each take-over round returned (a positive control for
    "not yet": rounds that ended before a lease did must have left its job alone)."""

    def __init__(self, store: store_grpc.StoreServiceStub, repo: Path) -> None:
        super().__init__(store, repo)
        self.looked: list[datetime] = []

    async def claim(self, owner: str, lease_seconds: float, reason: str) -> Claimed:
        claimed = await super().claim(owner, lease_seconds, reason)
        self.looked.append(datetime.now(UTC))
        return claimed


@dataclass
class World:
    store: store_grpc.StoreServiceStub
    repo: Path

    def runner(self, owner: str) -> tuple[JobRunner, CountingGateway]:
        gateway = CountingGateway(self.store, self.repo)
        runner = JobRunner(
            gateway,
            self.repo,
            rollout=ServeImmediately(self.store),
            owner=owner,
            max_parallel=1,
            lease_seconds=LEASE,
            heartbeat_seconds=BEAT,
            # No warm-up worker: two trainers' imports at once only slow a shared machine.
            worker_factory=lambda workers: ProcessWorker(workers, warm=False),
        )
        return runner, gateway

    async def job(self, job_id: int) -> store_pb.TrainingJob:
        response = await self.store.GetTrainingJob(store_pb.GetTrainingJobRequest(job_id=job_id))
        job: store_pb.TrainingJob = response.job
        return job


@pytest.fixture
async def world(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    server = (
        await start_store(
            StoreSettings(
                port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            store = store_grpc.StoreServiceStub(channel)
            repo = tmp_path / "models"
            await _register_champion(store, repo)
            yield World(store, repo)
    finally:
        await server.stop(0)


async def _ended(runner: JobRunner, job_id: int) -> Job:
    jobs = [job async for job in runner.watch(job_id)]
    return jobs[-1]


async def test_two_trainers_one_alert_one_job_and_a_left_queued_job_runs_once(
    world: World,
) -> None:
    await world.store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=SLIDING))
    await send_labelled(world.store, credit_frame(2000, seed=3, shift=1.5))
    (a, _), (b, _) = world.runner("trainer-a"), world.runner("trainer-b")
    await asyncio.gather(a.start(), b.start())
    try:
        # The monitor's alert reached both trainers (a retried delivery through Envoy).
        (job_a, created_a), (job_b, created_b) = await asyncio.gather(
            a.retrain(MODEL, alert_id=5, reason="accuracy dropped"),
            b.retrain(MODEL, alert_id=5, reason="accuracy dropped"),
        )
        assert job_a.id == job_b.id and sorted([created_a, created_b]) == [False, True]
        done = await _ended(a, job_a.id)
        assert done.state == "succeeded" and done.new_version == "2", done.message
        listed = await world.store.ListTrainingJobs(store_pb.ListTrainingJobsRequest(model=MODEL))
        assert [j.id for j in listed.jobs] == [job_a.id]

        # A trainer queued a job and died before it started it: once its lease ran out,
        # exactly one of the live trainers takes it over and runs it.
        c, _ = world.runner("trainer-c")  # never started: it never runs or renews anything
        left, created = await c.retrain(MODEL, reason="by hand")
        assert created and left.owner == "trainer-c"
        ended = await _ended(a, left.id)
        assert ended.owner in ("trainer-a", "trainer-b"), ended.owner
        assert ended.started_at is not None and ended.started_at >= left.lease_expires_at
        assert ended.state in ("succeeded", "rejected"), ended.message
        versions = await world.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(model=MODEL)
        )
        registered = [v.version for v in versions.model_versions]
        # Run once: at most one more version, never two for one job.
        assert registered in (["1", "2"], ["1", "2", "3"]), registered
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_trainer_that_stops_renewing_loses_its_running_job_only_after_the_lease(
    world: World,
) -> None:
    await world.store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=WAITING))
    (a, _), (b, b_gateway) = world.runner("trainer-a"), world.runner("trainer-b")
    await asyncio.gather(a.start(), b.start())
    try:
        job, _ = await a.retrain(MODEL, alert_id=9)

        async def waiting() -> bool:
            return (await world.job(job.id)).stage.startswith("waiting for labels")

        await eventually(waiting, 30, "the job waiting for labels")
        # Trainer a dies: its job stays "running" in the store, its lease no longer renewed.
        await a.stop()
        stopped = await world.job(job.id)
        lease_end = stopped.lease_expires_at.ToDatetime(tzinfo=UTC)
        stopped_at = datetime.now(UTC)
        # Trainer b looks for expired jobs within the lease (every BEAT s), and leaves it.
        while datetime.now(UTC) < lease_end:
            current = await world.job(job.id)
            if datetime.now(UTC) < lease_end:
                assert current.state == "running", current.message
            await asyncio.sleep(0.05)
        within = [t for t in b_gateway.looked if stopped_at < t < lease_end]
        assert within, "trainer b did not look for expired jobs while the lease ran"

        async def failed() -> bool:
            return (await world.job(job.id)).state == "failed"

        await eventually(failed, LEASE + 5, "trainer b failing the orphaned job")
        taken = await world.job(job.id)
        assert taken.owner == "trainer-b" and "lease expired" in taken.message
        assert taken.finished_at.ToDatetime(tzinfo=UTC) >= lease_end
        # Nothing half-made: no version registered for it.
        assert taken.new_version == ""

        # The alert is answered again, on the live trainer: one new job in the dead one's place.
        async def others() -> list[store_pb.TrainingJob]:
            listed = await world.store.ListTrainingJobs(
                store_pb.ListTrainingJobsRequest(model=MODEL), timeout=10
            )
            return [j for j in listed.jobs if j.id != job.id]

        async def queued_again() -> bool:
            return bool(await others())

        await eventually(queued_again, 10, "the alert's job queued again")
        [again] = await others()
        assert again.reason == f"alert 9 again: job {job.id} died with its trainer mid-run"
        await eventually(
            lambda: _stage_is(world, again.id, "waiting for labels"), 30, "b running the next job"
        )
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def _stage_is(world: World, job_id: int, prefix: str) -> bool:
    job = await world.job(job_id)
    return job.state == "running" and job.stage.startswith(prefix)
