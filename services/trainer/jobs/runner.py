"""The job runner: one queue per model, one job per model at a time, several models in parallel
up to a limit; the CPU work runs in a worker, every stage is recorded on the job in the store.

Several trainers share one store through leases: a trainer renews the lease of the jobs it owns
every `heartbeat_seconds`, and takes over the jobs whose lease expired (a queued one it runs, a
running one -- its fit died with its trainer -- it fails), each claimed by exactly one trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from cyclone import telemetry
from cyclone.errors import InvalidArgument
from cyclone.models.schema import validate_name
from services.trainer.fit import JobFailure

from .model import DISPATCHED, Job, JobGone, StoreFailure, WorkerDied
from .ports import JobDispatcher, JobStore, RolloutStarter, Worker
from .remote import REMOTE_TIMEOUT_SECONDS, run_remote
from .stages import JobStages
from .worker import ProcessWorker

log = logging.getLogger(__name__)

# How long a trainer holds its jobs without renewing them; a trainer that died loses its jobs
# this long after its last heartbeat (another trainer, or its restart, takes them over).
LEASE_SECONDS = 30.0
# The store's limit on a lease.
MAX_LEASE_SECONDS = 3600.0
TAKEN_OVER = (
    "its trainer stopped or restarted before the job finished (lease expired); retrain again"
)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        repository: Path,
        *,
        rollout: RolloutStarter,
        max_parallel: int = 2,
        owner: str | None = None,
        worker_factory: Callable[[int], Worker] = ProcessWorker,
        dispatcher: JobDispatcher | None = None,
        remote_timeout: float = REMOTE_TIMEOUT_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float | None = None,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel: must be at least 1")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds: must be positive")
        self.store = store
        self.repository = repository
        self.max_parallel = max_parallel
        self.rollout = rollout
        self.owner = owner or default_owner()
        self._worker_factory = worker_factory
        self.dispatcher = dispatcher
        self.remote_timeout = remote_timeout
        self.lease_seconds = lease_seconds
        # Three heartbeats per lease: one lost to a slow store does not lose the jobs.
        self.heartbeat_seconds = heartbeat_seconds or lease_seconds / 3
        self._worker: Worker | None = None
        self._slots = asyncio.Semaphore(max_parallel)
        # (job id, traceparent of the Retrain call that queued it)
        self._queues: dict[str, asyncio.Queue[tuple[int, str]]] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._leases: asyncio.Task[None] | None = None
        # Set once start() has run: the server takes Retrain calls (and health may already say
        # SERVING) while its start-up hooks still run; their jobs wait in the queue till then.
        self._started = asyncio.Event()

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take over the jobs whose trainer stopped (a previous process of this one, or another
        trainer), start the worker, accept jobs and keep this trainer's leases."""
        await self._claim_expired()
        if self.dispatcher is None:  # dispatched jobs fit elsewhere: no local workers
            # In a thread: starting the worker pool spawns a process (0.3-0.4 s measured).
            self._worker = await asyncio.to_thread(self._worker_factory, self.max_parallel)
        self._started.set()
        self._leases = asyncio.create_task(self._keep_leases(), name="trainer-job-leases")

    async def stop(self) -> None:
        """Stop running jobs here; their leases run out and another trainer takes them over."""
        tasks = [*self._consumers.values(), *([self._leases] if self._leases else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._consumers.clear()
        self._leases = None
        self._started.clear()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.store.heartbeat(self.owner, self.lease_seconds)
                await self._claim_expired()
            except Exception as exc:  # the store is away: try again at the next beat
                log.warning("job leases of %s: %s", self.owner, exc)

    async def _claim_expired(self) -> None:
        claimed = await self.store.claim(self.owner, self.lease_seconds, TAKEN_OVER)
        for job in claimed.failed:
            log.warning(
                "job %d of %s: its trainer's lease expired; marked failed", job.id, job.model
            )
            if job.alert_id:
                await self._answer_again(job)
        for job in claimed.queued:
            log.info("job %d of %s was left queued; taken over", job.id, job.model)
            self._enqueue(job.model, job.id)

    async def _answer_again(self, lost: Job) -> None:
        """An alert's job died with its trainer: nothing else would retrain (alerts come on
        level changes only), so the model would stay RED. One new job answers the alert again;
        it carries no alert, so if it dies too (a fit that kills its trainer) none follows."""
        reason = f"alert {lost.alert_id} again: job {lost.id} died with its trainer mid-run"
        try:
            again, _ = await self.retrain(lost.model, 0, reason)
        except Exception as exc:  # the store is away: the alert stays unanswered, say so
            log.error("job %d of %s: could not queue it again: %s", lost.id, lost.model, exc)
            return
        log.warning("job %d of %s queued again as job %d", lost.id, lost.model, again.id)

    async def run_one(self, job_id: int) -> Job:
        """Run one job another trainer queued (a Nomad batch job dispatched with its id), then
        return it as it ended. Other trainers' jobs are left alone. A job a trainer dispatched
        stops once its version is registered (stage `rollout`): that trainer rolls it out."""
        job = await self.store.get(job_id)
        if job.state == "queued":
            worker = self._worker_factory(1)
            try:
                # Not the job's owner (the dispatching trainer is): no owner check on writes.
                stages = self._stages(job_id, job.model, worker, owner="")
                await self._run(stages, roll_out=job.stage != DISPATCHED)
            finally:
                worker.close()
        return await self.store.get(job_id)

    # --- requests -----------------------------------------------------------------------

    async def retrain(self, model: str, alert_id: int = 0, reason: str = "") -> tuple[Job, bool]:
        try:
            validate_name("model", model)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if alert_id < 0:
            raise InvalidArgument("alert_id: must not be negative")
        await self.store.champion(model)  # unknown model: NOT_FOUND, no job
        job, created = await self.store.create(
            model,
            alert_id,
            reason or ("alert" if alert_id else "by hand"),
            self.owner,
            self.lease_seconds,
        )
        if created:
            traceparent = telemetry.current_traceparent()
            if traceparent:
                log.info(
                    "job %d of %s: trace %s", job.id, model, telemetry.trace_id_of(traceparent)
                )
            self._enqueue(model, job.id, traceparent)
        return job, created

    async def get(self, job_id: int) -> Job:
        if job_id <= 0:
            raise InvalidArgument("job_id: must be positive")
        return await self.store.get(job_id)

    async def list(self, model: str, state: str, limit: int) -> list[Job]:
        return await self.store.list_jobs(model, state, limit)

    async def cancel(self, job_id: int) -> Job:
        """Queued: it never runs. Running: it is marked cancelled now; the worker's result is
        discarded when it returns (nothing is written or registered after that)."""
        job = await self.get(job_id)
        if job.ended:
            return job
        try:
            return await self.store.update(
                job_id,
                expected="",
                state="cancelled",
                stage="done",
                message=f"cancelled while {job.stage}",
                finished_at=datetime.now(UTC),
            )
        except JobGone:
            return await self.get(job_id)  # it ended meanwhile

    async def watch(self, job_id: int, interval: float = 0.1) -> AsyncIterator[Job]:
        """The job now, then every change, until it ends."""
        last: datetime | None = None
        first = True
        while True:
            job = await self.get(job_id)
            if first or job.updated_at != last:
                first = False
                last = job.updated_at
                yield job
            if job.ended:
                return
            await asyncio.sleep(interval)

    # --- queues -------------------------------------------------------------------------

    def _enqueue(self, model: str, job_id: int, traceparent: str = "") -> None:
        queue = self._queues.setdefault(model, asyncio.Queue())
        queue.put_nowait((job_id, traceparent))
        consumer = self._consumers.get(model)
        if consumer is None or consumer.done():
            self._consumers[model] = asyncio.create_task(
                self._consume(model, queue), name=f"retrain-{model}"
            )

    async def _consume(self, model: str, queue: asyncio.Queue[tuple[int, str]]) -> None:
        await self._started.wait()
        while True:
            job_id, traceparent = await queue.get()
            span = telemetry.span(
                "trainer.job",
                parent=traceparent,
                attributes={"cyclone.job_id": job_id, "cyclone.model": model},
            )
            if self.dispatcher is not None:
                # The cluster does the work: no local slot, still one job per model at a time.
                try:
                    with span:
                        await run_remote(
                            self._stages(job_id, model, None, self.owner),
                            self.dispatcher,
                            self.remote_timeout,
                        )
                except Exception:
                    log.exception("job %d of %s crashed", job_id, model)
                continue
            async with self._slots:
                try:
                    with span:
                        await self._run(self._stages(job_id, model, self._worker, self.owner))
                except Exception:
                    log.exception("job %d of %s crashed", job_id, model)

    # --- one job ------------------------------------------------------------------------

    def _stages(self, job_id: int, model: str, worker: Worker | None, owner: str) -> JobStages:
        return JobStages(
            job_id,
            model,
            store=self.store,
            worker=worker,
            repository=self.repository,
            rollout=self.rollout,
            owner=owner,
        )

    async def _run(self, stages: JobStages, roll_out: bool = True) -> None:
        """Start the queued job, run its stages, and end it with the reason it failed."""
        try:
            job = await stages.update(
                "queued", state="running", stage="fetch", started_at=datetime.now(UTC)
            )
        except JobGone:
            return  # cancelled while queued, or taken over by another trainer
        try:
            await stages.execute(job.alert_id, job.created_at or datetime.now(UTC), roll_out)
        except JobGone as exc:
            log.info("job %d ended elsewhere (%s); result discarded", stages.job_id, exc)
        except JobFailure as exc:
            await stages.finish("failed", str(exc))
        except WorkerDied:
            self._replace_worker(stages)
            await stages.finish("failed", "fit: the worker process died")
        except StoreFailure as exc:
            await stages.finish("failed", exc.reason)
        except Exception as exc:
            log.exception("job %d failed", stages.job_id)
            await stages.finish("failed", f"internal error: {type(exc).__name__}: {exc}")

    def _replace_worker(self, stages: JobStages) -> None:
        """A new worker for the next jobs, unless another job already replaced the dead one."""
        dead = stages.worker
        if self._worker is dead and self._started.is_set():
            dead.close()
            self._worker = self._worker_factory(self.max_parallel)
