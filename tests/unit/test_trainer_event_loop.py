"""The trainer's event loop stays free while a job does blocking work: the leader's lease keeps
being renewed and other tasks keep running. The blocking parts are slowed down here (as on a
loaded machine); were they run on the loop again, the ticks would stop for that long."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_trainer_jobs import FakeStore, FakeWorker

from cyclone.store.v1 import store_service_pb2 as pb
from services.trainer import data
from services.trainer.fit import LABEL
from services.trainer.jobs import JobRunner
from services.trainer.leader import LeaderElection

T = TypeVar("T")
BLOCKING_SECONDS = 0.6
# Far less than the blocking part: the loop ran other tasks meanwhile.
MAX_TICK_GAP_SECONDS = 0.25


async def _longest_gap(work: Awaitable[T], every: float = 0.01) -> tuple[T, float]:
    """`work`'s result and the longest the loop took to run a task ticking every `every`."""
    ticks = [time.monotonic()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            ticks.append(time.monotonic())

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)  # the ticker waits before the work starts
    try:
        result = await work
    finally:
        ticker.cancel()
    ticks.append(time.monotonic())  # work that blocked to its end counts too
    return result, max(b - a for a, b in itertools.pairwise(ticks))


class LeaseStore:
    """A store that grants the role to whoever asks, counting the renewals."""

    def __init__(self) -> None:
        self.renewals: list[float] = []

    async def AcquireRoleLease(self, request: pb.AcquireRoleLeaseRequest, **_: Any) -> Any:
        self.renewals.append(time.monotonic())
        lease = pb.RoleLease(holder=request.holder, epoch=1, address=request.address)
        return pb.AcquireRoleLeaseResponse(held=True, lease=lease)

    async def ReleaseRoleLease(self, request: pb.ReleaseRoleLeaseRequest, **_: Any) -> Any:
        return pb.ReleaseRoleLeaseResponse(released=True)


async def _chunks(rows: int) -> AsyncIterator[pb.GetTrainingDataResponse]:
    chunk = pb.GetTrainingDataResponse(
        prediction_ids=[f"p{i}" for i in range(rows)],
        created_at_micros=list(range(rows)),
    )
    chunk.features["age"].numbers.extend(float(i) for i in range(rows))
    chunk.features["city"].strings.extend("porto" for _ in range(rows))
    chunk.labels.strings.extend(str(i % 2) for i in range(rows))
    chunk.predictions.strings.extend("0" for _ in range(rows))
    yield chunk


async def _nothing() -> None:
    return None


async def test_the_leader_keeps_renewing_while_a_jobs_window_is_assembled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assemble = data.assemble

    def slow_assemble(*args: Any) -> data.LabelledWindow:
        time.sleep(BLOCKING_SECONDS)  # pandas' import and the frame, on a loaded machine
        return assemble(*args)

    monkeypatch.setattr(data, "assemble", slow_assemble)
    store = LeaseStore()
    election = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=_nothing,
        on_deposed=_nothing,
        holder="t1",
        lease_seconds=0.3,
    )
    await election.start()
    try:
        started = time.monotonic()
        window, gap = await _longest_gap(
            data.collect(
                _chunks(50), (("age", "numeric"), ("city", "categorical")), "classification"
            )
        )
        took = time.monotonic() - started
        during = [t for t in store.renewals if started < t < started + took]
        assert election.leads
    finally:
        await election.stop()
    assert window.rows == 50 and list(window.frame.columns) == ["age", "city", LABEL]
    assert took >= BLOCKING_SECONDS  # the slow part did run
    assert gap < MAX_TICK_GAP_SECONDS, gap
    # A renewal every 0.1 s: several while the window was assembled.
    assert len(during) >= 3, (during, took)


async def test_starting_the_job_runner_does_not_hold_the_loop_while_its_worker_starts(
    tmp_path: Path,
) -> None:
    created: list[FakeWorker] = []

    def slow_worker(count: int) -> FakeWorker:
        time.sleep(BLOCKING_SECONDS)  # spawning the worker pool's first process
        created.append(FakeWorker(tmp_path))
        return created[-1]

    runner = JobRunner(
        FakeStore(tmp_path),  # type: ignore[arg-type]
        tmp_path,
        rollout=None,  # type: ignore[arg-type]
        owner="me",
        worker_factory=slow_worker,  # type: ignore[arg-type]
    )
    _, gap = await _longest_gap(runner.start())
    try:
        assert len(created) == 1  # the worker was started, slowly
        assert gap < MAX_TICK_GAP_SECONDS, gap
    finally:
        await runner.stop()
