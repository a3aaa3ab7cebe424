"""The job runner over in-memory ports: the paths a real store and real workers rarely take --
a worker that dies, a store that fails mid-job, a job cancelled while it runs, leases."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from cyclone.errors import NotFound
from cyclone.plan import Plan, parse_plan
from services.trainer.data import LabelledWindow
from services.trainer.fit import LABEL, FitOutcome, FitTask, WrittenVersion
from services.trainer.jobs import (
    Job,
    JobGone,
    JobRunner,
    ProcessWorker,
    StoreFailure,
    WorkerDied,
)
from services.trainer.jobs.model import Champion, Claimed, TrainedVersion

MODEL = "m"
PLAN = """
model: m
metrics: [rmse]
retrain: {window: sliding, rows: 1000, min_rows: 20, holdout: 0.25}
"""
FEATURES = (("x", "numeric"),)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class FakeStore:
    """The `JobStore` port in memory, with the store's compare-and-set rules."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.jobs: dict[int, Job] = {}
        self.registered: list[TrainedVersion] = []
        self.register_error: Exception | None = None
        self.heartbeat_error: Exception | None = None
        self.heartbeats = 0
        self.now = datetime.now(UTC)

    async def create(
        self, model: str, alert_id: int, reason: str, owner: str, lease_seconds: float
    ) -> tuple[Job, bool]:
        for job in self.jobs.values():
            if alert_id and job.alert_id == alert_id:
                return job, False
        job = Job(
            id=len(self.jobs) + 1,
            model=model,
            state="queued",
            alert_id=alert_id,
            reason=reason,
            owner=owner,
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
            lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_seconds),
        )
        self.jobs[job.id] = job
        return job, True

    async def get(self, job_id: int) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"job_id: {job_id} not found")
        return self.jobs[job_id]

    async def list_jobs(self, model: str, state: str, limit: int) -> list[Job]:
        return [j for j in self.jobs.values() if state in ("", j.state)][:limit]

    async def update(
        self, job_id: int, *, expected: str = "running", owner: str = "", **changes: Any
    ) -> Job:
        job = self.jobs[job_id]
        if job.ended or (expected and job.state != expected) or (owner and job.owner != owner):
            raise JobGone(f"job_id: job {job_id} is {job.state}")
        job = dataclasses.replace(job, updated_at=datetime.now(UTC), **changes)
        self.jobs[job_id] = job
        return job

    async def heartbeat(self, owner: str, lease_seconds: float) -> list[int]:
        self.heartbeats += 1
        if self.heartbeat_error is not None:
            raise self.heartbeat_error
        return [j.id for j in self.jobs.values() if j.owner == owner and not j.ended]

    async def claim(self, owner: str, lease_seconds: float, reason: str) -> Claimed:
        now = datetime.now(UTC)
        queued, failed = [], []
        for job in list(self.jobs.values()):
            if job.ended or job.lease_expires_at is None or job.lease_expires_at > now:
                continue
            lease = now + timedelta(seconds=lease_seconds)
            if job.state == "running":
                taken = dataclasses.replace(
                    job, owner=owner, state="failed", message=reason, lease_expires_at=lease
                )
                failed.append(taken)
            else:
                taken = dataclasses.replace(job, owner=owner, lease_expires_at=lease)
                queued.append(taken)
            self.jobs[job.id] = taken
        return Claimed(queued, failed)

    async def champion(self, model: str) -> Champion:
        if model != MODEL:
            raise NotFound(f"model: {model!r} is not registered")
        return Champion("1", self.repository / MODEL / "1", "regression", FEATURES)

    async def plan(self, model: str, task: str) -> Plan:
        return parse_plan(PLAN)

    async def window(
        self, model: str, champion: Champion, plan: Plan, since: datetime | None = None
    ) -> LabelledWindow:
        x = np.arange(100, dtype=float)
        frame = pd.DataFrame({"x": x, LABEL: 2 * x})
        return LabelledWindow(frame, self.now - timedelta(hours=1), self.now)

    async def versions(self, model: str) -> list[str]:
        return ["1", *(v.version for v in self.registered)]

    async def register(self, job_id: int, version: TrainedVersion) -> None:
        if self.register_error is not None:
            raise self.register_error
        if self.jobs[job_id].state != "running":
            raise JobGone(f"job_id: job {job_id} is {self.jobs[job_id].state}, not running")
        self.registered.append(version)
        await self.update(job_id, new_version=version.version)

    async def active_rollout(self, model: str) -> str:
        return ""

    async def levels(self, model: str) -> dict[str, str]:
        return {"1": "RED"}


class FakeWorker:
    """Fits at once (or, with `hold`, once it is set), writes a directory like the real one."""

    def __init__(self, repository: Path, hold: asyncio.Event | None = None) -> None:
        self.repository = repository
        self.hold = hold
        self.die = False
        self.fits = 0
        self.fitting = asyncio.Event()
        self.writes: list[str] = []
        self.closed = False

    async def fit(self, task: FitTask) -> FitOutcome:
        self.fits += 1
        self.fitting.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.die:
            raise WorkerDied("the worker process died")
        return FitOutcome(
            promote=True,
            decision="challenger wins: rmse 1.0 vs 2.0",
            decision_numbers={"delta": 1.0},
            champion_metrics={"rmse": 2.0},
            challenger_metrics={"rmse": 1.0},
            hyperparameters={"alpha": 1},
            pipeline=b"fitted",
            train_rows=len(task.train),
        )

    async def write_version(
        self,
        pipeline: bytes,
        model: str,
        repository: str,
        version: str,
        sample: pd.DataFrame,
        extra: dict[str, Any],
    ) -> WrittenVersion:
        directory = Path(repository) / model / version
        directory.mkdir(parents=True)
        (directory / "model.onnx").write_bytes(pipeline)
        self.writes.append(version)
        return WrittenVersion(str(directory), "sha", {"features": []}, None, None)

    def close(self) -> None:
        self.closed = True


class Served:
    def __init__(self) -> None:
        self.versions: list[str] = []

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        self.versions.append(version)
        return f"rollout-{version}"


@dataclasses.dataclass
class Rig:
    store: FakeStore
    runner: JobRunner
    workers: list[FakeWorker]
    served: Served
    repository: Path

    async def ended(self, job_id: int) -> Job:
        await until(lambda: self.store.jobs[job_id].ended)
        return self.store.jobs[job_id]


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    repository = tmp_path / "models"
    (repository / MODEL / "1").mkdir(parents=True)
    store = FakeStore(repository)
    workers: list[FakeWorker] = []

    def new_worker(count: int) -> FakeWorker:
        workers.append(FakeWorker(repository))
        return workers[-1]

    served = Served()
    runner = JobRunner(
        store, repository, rollout=served, owner="me", worker_factory=new_worker, lease_seconds=1
    )
    await runner.start()
    yield Rig(store, runner, workers, served, repository)
    await runner.stop()


async def test_a_job_registers_its_lineage_and_hands_the_version_to_the_rollout(rig: Rig) -> None:
    job, created = await rig.runner.retrain(MODEL, alert_id=7)
    assert created and job.owner == "me"
    done = await rig.ended(job.id)
    assert done.state == "succeeded", done.message
    assert done.new_version == "2" and done.rollout_id == "rollout-2"
    assert done.message.startswith("version 2 registered and handed to the rollout; window")
    assert (done.window_rows, done.train_rows, done.holdout_rows) == (100, 75, 25)
    [version] = rig.store.registered
    assert (version.parent_version, version.alert_id, version.training_rows) == ("1", 7, 75)
    assert version.holdout_metrics["window"]["kind"] == "sliding"
    assert rig.served.versions == ["2"]


async def test_a_dead_worker_fails_the_job_and_the_next_job_gets_a_new_worker(rig: Rig) -> None:
    rig.workers[0].die = True
    first, _ = await rig.runner.retrain(MODEL, alert_id=1)
    failed = await rig.ended(first.id)
    assert failed.state == "failed" and failed.message == "fit: the worker process died"
    assert rig.workers[0].closed and len(rig.workers) == 2
    assert rig.store.registered == [] and rig.workers[0].writes == []
    second, _ = await rig.runner.retrain(MODEL, alert_id=2)
    assert (await rig.ended(second.id)).state == "succeeded"
    assert rig.workers[1].fits == 1


async def test_a_store_error_while_registering_fails_the_job_and_leaves_nothing_behind(
    rig: Rig,
) -> None:
    rig.store.register_error = StoreFailure(grpc.StatusCode.UNAVAILABLE, "connection reset")
    first, _ = await rig.runner.retrain(MODEL, alert_id=1)
    failed = await rig.ended(first.id)
    assert failed.state == "failed"
    assert failed.message == "store: UNAVAILABLE: connection reset"
    assert failed.new_version == "" and rig.store.registered == []
    # The converted version was written, then removed: no half-made version directory.
    assert rig.workers[0].writes == ["2"]
    assert sorted(p.name for p in (rig.repository / MODEL).iterdir()) == ["1"]
    assert rig.served.versions == []
    # The next alert still retrains.
    rig.store.register_error = None
    second, created = await rig.runner.retrain(MODEL, alert_id=2)
    assert created
    done = await rig.ended(second.id)
    assert done.state == "succeeded" and done.new_version == "2"


async def test_cancelling_a_running_job_discards_its_fit(rig: Rig) -> None:
    hold = asyncio.Event()
    rig.workers[0].hold = hold
    job, _ = await rig.runner.retrain(MODEL, alert_id=1)
    await asyncio.wait_for(rig.workers[0].fitting.wait(), 10)
    cancelled = await rig.runner.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.message == "cancelled while fit"
    hold.set()
    # Positive control: the model's next job runs (one job per model at a time), so the
    # cancelled one has finished with its fit by then.
    later, _ = await rig.runner.retrain(MODEL, alert_id=2)
    assert (await rig.ended(later.id)).state == "succeeded"
    after = rig.store.jobs[job.id]
    assert after.state == "cancelled" and after.new_version == ""
    assert [v.version for v in rig.store.registered] == ["2"]
    assert rig.workers[0].fits == 2 and rig.workers[0].writes == ["2"]
    assert rig.served.versions == ["2"]


async def test_the_runner_renews_its_leases_and_a_failed_heartbeat_does_not_stop_it(
    rig: Rig,
) -> None:
    rig.store.heartbeat_error = StoreFailure(grpc.StatusCode.UNAVAILABLE, "store away")
    beats = rig.store.heartbeats
    await until(lambda: rig.store.heartbeats >= beats + 2)
    rig.store.heartbeat_error = None
    job, _ = await rig.runner.retrain(MODEL)
    await rig.ended(job.id)
    beats = rig.store.heartbeats
    await until(lambda: rig.store.heartbeats > beats)


async def test_expired_jobs_are_taken_over_queued_ones_run_running_ones_fail(
    rig: Rig,
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    store = rig.store
    store.jobs[1] = Job(1, MODEL, "queued", owner="dead", lease_expires_at=past)
    store.jobs[2] = Job(2, MODEL, "running", owner="dead", lease_expires_at=past)
    store.jobs[3] = Job(
        3, MODEL, "queued", owner="alive", lease_expires_at=past + timedelta(hours=1)
    )
    done = await rig.ended(1)
    assert done.state == "succeeded" and done.owner == "me"
    failed = store.jobs[2]
    assert failed.state == "failed" and "lease expired" in failed.message
    assert store.jobs[3].state == "queued" and store.jobs[3].owner == "alive"


async def test_an_alerts_job_that_died_with_its_trainer_is_answered_again_once(
    rig: Rig,
) -> None:
    """The alert's job was running on a trainer that was killed: a new job retrains (the model
    would otherwise stay RED, alerts come on level changes only); a by-hand job is not
    repeated, nor is the repeat if it dies too."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    store = rig.store
    store.jobs[1] = Job(1, MODEL, "running", alert_id=7, owner="dead", lease_expires_at=past)
    store.jobs[2] = Job(2, MODEL, "running", owner="dead", lease_expires_at=past)
    await until(lambda: len(store.jobs) == 3 and store.jobs[3].ended)
    again = store.jobs[3]
    assert again.state == "succeeded" and again.alert_id == 0, again
    assert again.reason == "alert 7 again: job 1 died with its trainer mid-run"
    assert store.jobs[1].state == "failed" and store.jobs[2].state == "failed"
    # The repeat dying too is not repeated.
    store.jobs[3] = dataclasses.replace(again, state="running", lease_expires_at=past)
    await until(lambda: store.jobs[3].state == "failed")
    beats = store.heartbeats
    await until(lambda: store.heartbeats >= beats + 2)  # a further claim round went by
    assert len(store.jobs) == 3


async def test_unknown_model_and_bad_ids_are_refused_before_any_job(rig: Rig) -> None:
    with pytest.raises(NotFound, match="model: 'nope'"):
        await rig.runner.retrain("nope")
    with pytest.raises(Exception, match="alert_id"):
        await rig.runner.retrain(MODEL, alert_id=-1)
    with pytest.raises(Exception, match="job_id"):
        await rig.runner.get(0)
    assert rig.store.jobs == {}


def _spawn_pool(pools: list[Executor]) -> Callable[[int], Executor]:
    def factory(workers: int) -> Executor:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        pools.append(pool)
        return pool

    return factory


async def test_a_worker_process_that_dies_is_reported_as_worker_died() -> None:
    pools: list[Executor] = []
    worker = ProcessWorker(1, _spawn_pool(pools), warm=False)
    try:
        # The process running a job dies (as when the kernel kills it for memory).
        killed: Awaitable[Any] = asyncio.get_running_loop().run_in_executor(pools[0], os._exit, 9)
        with pytest.raises(Exception, match="terminated abruptly"):
            await killed
        with pytest.raises(WorkerDied, match="worker process died"):
            await worker.write_version(b"", MODEL, "/nonexistent", "2", pd.DataFrame(), {})
    finally:
        worker.close()


def test_the_servicer_sends_the_domain_job_as_the_trainer_proto() -> None:
    from cyclone.trainer.v1 import trainer_service_pb2 as pb
    from services.trainer import convert

    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    job = Job(
        7,
        MODEL,
        "rejected",
        alert_id=3,
        window_rows=10,
        train_rows=7,
        holdout_rows=3,
        window_start=start,
        window_end=start + timedelta(hours=1),
        champion_metrics={"rmse": 2.0},
        challenger_metrics={"rmse": 2.5},
        created_at=start,
    )
    sent = convert.job_to_pb(job)
    assert sent.state == pb.JOB_STATE_REJECTED and sent.alert_id == 3
    assert (sent.window.rows, sent.window.train_rows, sent.window.holdout_rows) == (10, 7, 3)
    assert sent.window.start.ToDatetime(tzinfo=UTC) == start
    assert dict(sent.challenger_metrics) == {"rmse": 2.5}
    assert sent.created_at.ToDatetime(tzinfo=UTC) == start
    assert not sent.HasField("finished_at")
    assert convert.job_state_from_pb(pb.JOB_STATE_QUEUED) == "queued"
    with pytest.raises(Exception, match="state: unknown job state 99"):
        convert.job_state_from_pb(99)
