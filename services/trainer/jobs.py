"""Retraining jobs: one queue per model, one job per model at a time, several models in parallel
up to a limit. The CPU work runs in worker processes; this module only orchestrates, and keeps
every step on the job's record in the store (the store owns the database).

A job: fetch the labelled window (plan ``retrain:``) -> too few rows: NOT_ENOUGH_DATA -> split off
the newest rows as the holdout -> fit the family in a worker -> champion vs challenger on the
holdout -> not better (or maybe noise): REJECTED, nothing written -> convert + parity + reference
(the version directory appears atomically) -> register with lineage in one store transaction ->
hand to the rollout -> SUCCEEDED.

With ``retrain.window: auto`` (the default) the window is cut at the change point of the served
predictions' loss, a job an alert asked for first waits for labelled rows after it, features
that broke there end the job (a data fault, told to the plan's notify sinks), candidate windows
are fitted and the best on the newest rows is the challenger; a rejected one is tried again
while the model stays RED, up to ``retrain.attempts``, and the sinks hear when none won.

With tracing on, a job runs in a `trainer.job` span continuing the trace of the Retrain call that
queued it (for an alert: the monitor's evaluation), each stage an event on it, fit/convert/rollout
child spans; the trace id is logged and ends the job's final message.

With a dispatcher (`job_executor: nomad`) the trainer does not fit locally: each queued job is
dispatched (a Nomad parameterized batch job running `cyclone serve trainer --run-job-file`), the
trainer follows it in the store, and once the remote run registered the version (stage
`rollout`, still running) the trainer hands it to the rollout and ends the job: the remote run
has no traffic router, so it never rolls out a job a trainer dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from cyclone import telemetry
from cyclone.errors import InvalidArgument, NotFound
from cyclone.models.registration import with_probes
from cyclone.models.repository import ModelRepository
from cyclone.models.schema import validate_name
from cyclone.plan import Plan, PlanError, default_plan, parse_plan, primary_metric
from cyclone.plugin_api import Alert
from cyclone.plugins import get_plugins
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.wire import ts_or_none
from services.trainer.auto import AutoWindow, broken_features, locate_change, plan_auto
from services.trainer.data import LabelledWindow, collect, window_request
from services.trainer.evaluate import class_counts, split_holdout
from services.trainer.fit import (
    LABEL,
    FitOutcome,
    FitTask,
    JobFailure,
    fit_and_evaluate,
    warm_up,
    write_version,
)

log = logging.getLogger(__name__)

# How often a `since_alert` or `auto` job looks for newly labelled rows.
FRESH_POLL_SECONDS = 2.0
# Backoff before the second attempt of a rejected alert's job; doubles after each attempt.
RETRY_BACKOFF_SECONDS = 15.0

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "not_enough_data", "rejected"})
# Stage of a queued job a trainer dispatched to run elsewhere: that trainer rolls it out.
DISPATCHED = "dispatched"
# How often the dispatching trainer looks at a remote job, and how long it waits at most on top
# of the plan's `retrain.wait` (fit + convert of a large window on a busy cluster).
REMOTE_POLL_SECONDS = 0.5
# How often it asks the cluster whether the run is still there (a run that died before it
# could record anything, say a bad image, would otherwise be noticed only at the timeout).
REMOTE_CHECK_SECONDS = 2.0
REMOTE_TIMEOUT_SECONDS = 3600.0
STORE_TIMEOUT = 30.0
T = TypeVar("T")


class RolloutStarter(Protocol):
    """Takes a registered (staged) version live; returns the rollout id ("" when none).

    The integrator wires the rollout engine here; the default makes the version SERVING."""

    async def __call__(self, model: str, version: str, job_id: int) -> str: ...


class ServeImmediately:
    """The default rollout: set the new version SERVING in the registry (retires the old one)."""

    def __init__(self, store: store_grpc.StoreServiceStub) -> None:
        self.store = store

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        await self.store.SetModelStatus(
            store_pb.SetModelStatusRequest(
                model=model, version=version, status=store_pb.MODEL_STATUS_SERVING
            ),
            timeout=STORE_TIMEOUT,
        )
        return ""


class JobDispatcher(Protocol):
    """Runs jobs elsewhere (the `nomad` executor: a dispatch of the retrain batch job)."""

    async def dispatch(self, job_id: int, model: str) -> str:
        """Start job `job_id` of `model`; returns the run's id. Raises, naming why, when the
        cluster refuses."""
        ...

    async def ended(self, remote: str) -> str:
        """ "" while run `remote` may still be going; once it is over, how it ended."""
        ...


def _log_warm_up_failure(future: Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # Not fatal: the job that needs the worker meets (and records) the same problem.
        log.warning("trainer worker warm-up failed: %s", future.exception())


class _JobGone(Exception):
    """The job ended elsewhere (cancelled, or failed by a restarted trainer): stop quietly."""


@dataclass(frozen=True)
class Champion:
    version: str
    directory: Path
    task: str
    features: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Prepared:
    """One attempt's rows: the window, how it was cut, the candidate windows to fit (first is
    the preferred one on a tie) and the holdout."""

    window: LabelledWindow
    auto: AutoWindow
    trains: list[tuple[str, Any]]
    holdout: Any
    fields: dict[str, Any]
    lineage: dict[str, Any]

    @property
    def fresh(self) -> int:
        return self.auto.fresh_rows


def _window_text(outcome: FitOutcome, prepared: Prepared) -> str:
    """Which window the challenger was fitted on, and why that one, for the job's record."""
    text = f"window {outcome.window} ({outcome.train_rows} rows)"
    change = prepared.auto.change
    if change is not None:
        text += f", change point: {change.describe(prepared.window.rows)}"
    if len(outcome.candidates) > 1:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in outcome.candidates.items())
        text += f"; candidates on the holdout: {scores}"
    return text


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def spawn_pool(workers: int) -> Executor:
    # spawn: a forked child would inherit the gRPC event loop and threads.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


class JobRunner:
    def __init__(
        self,
        store: store_grpc.StoreServiceStub,
        repository: Path,
        *,
        max_parallel: int = 2,
        rollout: RolloutStarter | None = None,
        owner: str | None = None,
        pool_factory: Callable[[int], Executor] = spawn_pool,
        dispatcher: JobDispatcher | None = None,
        remote_timeout: float = REMOTE_TIMEOUT_SECONDS,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel: must be at least 1")
        self.store = store
        self.repository = repository
        self.max_parallel = max_parallel
        self.rollout: RolloutStarter = rollout or ServeImmediately(store)
        self.owner = owner or default_owner()
        self._pool_factory = pool_factory
        self.dispatcher = dispatcher
        self.remote_timeout = remote_timeout
        self._pool: Executor | None = None
        self._slots = asyncio.Semaphore(max_parallel)
        # (job id, traceparent of the Retrain call that queued it)
        self._queues: dict[str, asyncio.Queue[tuple[int, str]]] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}
        # Set once start() has run: the server takes Retrain calls (and health may already say
        # SERVING) while its start-up hooks still run; their jobs wait in the queue till then.
        self._started = asyncio.Event()

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Fail the jobs a previous trainer process left queued or running, then accept jobs."""
        response = await self.store.FailOrphanedTrainingJobs(
            store_pb.FailOrphanedTrainingJobsRequest(
                owner=self.owner,
                reason="the trainer restarted before the job finished; retrain again",
            ),
            timeout=STORE_TIMEOUT,
        )
        for job in response.jobs:
            log.warning("job %d of %s was left %s; marked failed", job.id, job.model, job.stage)
        if self.dispatcher is None:  # dispatched jobs fit elsewhere: no local workers
            self._pool = self._pool_factory(self.max_parallel)
            self._warm_pool()
        self._started.set()

    def _warm_pool(self) -> None:
        """Start one worker and its imports now, in the background: spawning a worker and
        importing scikit-learn, skl2onnx and onnxruntime took seconds of the first job's fit
        stage. One is enough for the usual single job; it stays idle and is reused."""
        assert self._pool is not None
        self._pool.submit(warm_up).add_done_callback(_log_warm_up_failure)

    async def stop(self) -> None:
        for task in self._consumers.values():
            task.cancel()
        for task in self._consumers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._consumers.clear()
        self._started.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run_one(self, job_id: int) -> store_pb.TrainingJob:
        """Run one job another trainer queued (a Nomad batch job dispatched with its id), then
        return it as it ended. Other trainers' jobs are left alone. A job a trainer dispatched
        stops once its version is registered (stage `rollout`): that trainer rolls it out."""
        response = await self.store.GetTrainingJob(
            store_pb.GetTrainingJobRequest(job_id=job_id), timeout=STORE_TIMEOUT
        )
        if response.job.state == "queued":
            self._pool = self._pool_factory(1)
            try:
                await self._run(
                    job_id, response.job.model, roll_out=response.job.stage != DISPATCHED
                )
            finally:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        ended = await self.store.GetTrainingJob(
            store_pb.GetTrainingJobRequest(job_id=job_id), timeout=STORE_TIMEOUT
        )
        job: store_pb.TrainingJob = ended.job
        return job

    # --- requests -----------------------------------------------------------------------

    async def retrain(
        self, model: str, alert_id: int = 0, reason: str = ""
    ) -> tuple[store_pb.TrainingJob, bool]:
        try:
            validate_name("model", model)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if alert_id < 0:
            raise InvalidArgument("alert_id: must not be negative")
        await self._champion(model)  # unknown model: NOT_FOUND, no job
        response = await self.store.CreateTrainingJob(
            store_pb.CreateTrainingJobRequest(
                model=model,
                alert_id=alert_id,
                reason=reason or ("alert" if alert_id else "by hand"),
                owner=self.owner,
            ),
            timeout=STORE_TIMEOUT,
        )
        if response.created:
            traceparent = telemetry.current_traceparent()
            if traceparent:
                log.info(
                    "job %d of %s: trace %s",
                    response.job.id,
                    model,
                    telemetry.trace_id_of(traceparent),
                )
            self._enqueue(model, response.job.id, traceparent)
        return response.job, response.created

    async def get(self, job_id: int) -> store_pb.TrainingJob:
        if job_id <= 0:
            raise InvalidArgument("job_id: must be positive")
        response = await self.store.GetTrainingJob(
            store_pb.GetTrainingJobRequest(job_id=job_id), timeout=STORE_TIMEOUT
        )
        job: store_pb.TrainingJob = response.job
        return job

    async def list(self, model: str, state: str, limit: int) -> list[store_pb.TrainingJob]:
        response = await self.store.ListTrainingJobs(
            store_pb.ListTrainingJobsRequest(model=model, state=state, limit=limit),
            timeout=STORE_TIMEOUT,
        )
        return list(response.jobs)

    async def cancel(self, job_id: int) -> store_pb.TrainingJob:
        """Queued: it never runs. Running: it is marked cancelled now; the worker's result is
        discarded when it returns (nothing is written or registered after that)."""
        job = await self.get(job_id)
        if job.state in TERMINAL:
            return job
        try:
            response = await self.store.UpdateTrainingJob(
                store_pb.UpdateTrainingJobRequest(
                    job_id=job_id,
                    state="cancelled",
                    stage="done",
                    message=f"cancelled while {job.stage}",
                    finished_at=ts_or_none(datetime.now(UTC)),
                ),
                timeout=STORE_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            return await self.get(job_id)  # it ended meanwhile
        cancelled: store_pb.TrainingJob = response.job
        return cancelled

    async def watch(
        self, job_id: int, interval: float = 0.1
    ) -> AsyncIterator[store_pb.TrainingJob]:
        """The job now, then every change, until it ends."""
        last: tuple[int, int] | None = None
        while True:
            job = await self.get(job_id)
            stamp = (job.updated_at.seconds, job.updated_at.nanos)
            if stamp != last:
                last = stamp
                yield job
            if job.state in TERMINAL:
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
            if self.dispatcher is not None:
                # The cluster does the work: no local slot, still one job per model at a time.
                try:
                    with telemetry.span(
                        "trainer.job",
                        parent=traceparent,
                        attributes={"cyclone.job_id": job_id, "cyclone.model": model},
                    ):
                        await self._run_remote(job_id, model, self.dispatcher)
                except Exception:
                    log.exception("job %d of %s crashed", job_id, model)
                continue
            async with self._slots:
                try:
                    with telemetry.span(
                        "trainer.job",
                        parent=traceparent,
                        attributes={"cyclone.job_id": job_id, "cyclone.model": model},
                    ):
                        await self._run(job_id, model)
                except Exception:
                    log.exception("job %d of %s crashed", job_id, model)

    # --- one job ------------------------------------------------------------------------

    async def _update(
        self, job_id: int, expected: str = "running", **fields: Any
    ) -> store_pb.TrainingJob:
        for name in ("champion_metrics", "challenger_metrics"):
            if name in fields:
                fields[f"{name}_json"] = json.dumps(fields.pop(name))
        for name, value in list(fields.items()):
            if isinstance(value, datetime):
                fields[name] = ts_or_none(value)
        if "stage" in fields:
            telemetry.add_event(
                f"stage {fields['stage']}", {"cyclone.state": fields.get("state", expected)}
            )
        try:
            response = await self.store.UpdateTrainingJob(
                store_pb.UpdateTrainingJobRequest(job_id=job_id, expected_state=expected, **fields),
                timeout=STORE_TIMEOUT,
            )
            updated: store_pb.TrainingJob = response.job
            return updated
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise _JobGone(exc.details()) from None
            raise

    async def _finish(
        self, job_id: int, state: str, message: str, expected: str = "running", **fields: Any
    ) -> None:
        trace_id = telemetry.current_trace_id()
        if trace_id:
            message = f"{message} (trace {trace_id})"
        with contextlib.suppress(_JobGone):
            await self._update(
                job_id,
                expected,
                state=state,
                stage="done",
                message=message,
                finished_at=datetime.now(UTC),
                **fields,
            )
        log.info("job %d: %s: %s", job_id, state, message)

    async def _run(self, job_id: int, model: str, roll_out: bool = True) -> None:
        try:
            job = await self._update(
                job_id, "queued", state="running", stage="fetch", started_at=datetime.now(UTC)
            )
        except _JobGone:
            return  # cancelled while queued
        try:
            await self._execute(
                job_id, model, job.alert_id, job.created_at.ToDatetime(UTC), roll_out
            )
        except _JobGone as exc:
            log.info("job %d ended elsewhere (%s); result discarded", job_id, exc)
        except JobFailure as exc:
            await self._finish(job_id, "failed", str(exc))
        except BrokenProcessPool:
            self._pool = self._pool_factory(self.max_parallel)
            self._warm_pool()
            await self._finish(job_id, "failed", "fit: the worker process died")
        except grpc.aio.AioRpcError as exc:
            await self._finish(job_id, "failed", f"store: {exc.code().name}: {exc.details()}")
        except Exception as exc:
            log.exception("job %d failed", job_id)
            await self._finish(job_id, "failed", f"internal error: {type(exc).__name__}: {exc}")

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise RuntimeError("JobRunner is not started")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _execute(
        self, job_id: int, model: str, alert_id: int, asked_at: datetime, roll_out: bool = True
    ) -> None:
        champion = await self._champion(model)
        rolling = await self._rollout_in_progress(model)
        if rolling and roll_out:
            # The answer to this alert may already be on its way; a challenger fitted now
            # could not be rolled out anyway (one rollout per model).
            await self._finish(job_id, "cancelled", f"{rolling} is in progress: retrain after it")
            return
        plan = await self._plan(model, champion.task)
        spec = plan.retrain
        auto = spec.kind == "auto" and not spec.since_alert
        # Retries only for what an alert asked: a rejected challenger while the model is RED.
        attempts = spec.attempts if auto and alert_id else 1
        fresh_wanted = spec.fresh_rows
        last = ""
        for attempt in range(1, attempts + 1):
            prepared = await self._prepare(
                job_id, model, champion, plan, alert_id, asked_at, fresh_wanted
            )
            if prepared is None:
                return  # finished: not enough data, or a data fault
            outcome = await self._fit(job_id, model, champion, plan, prepared)
            if outcome.promote:
                await self._register(
                    job_id, model, champion, plan, alert_id, prepared, outcome, roll_out
                )
                return
            last = f"{_window_text(outcome, prepared)}; {outcome.decision}"
            if attempt == attempts:
                break
            red = await self._still_red(model, champion.version)
            if not red:
                await self._finish(job_id, "rejected", f"{last}; the model is no longer RED")
                return
            # The next challenger needs new rows of the new world: twice as many after the
            # change, and a backoff that doubles, both bounded by retrain.wait.
            delay = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
            next_at = datetime.now(UTC) + timedelta(seconds=delay)
            rows = "the rows labelled by then"
            if prepared.auto.change is not None:
                fresh_wanted = max(fresh_wanted, 2 * prepared.fresh)
                rows = f"{fresh_wanted} labelled rows after the change"
            await self._update(
                job_id,
                stage=f"attempt {attempt + 1}/{attempts} at {next_at:%H:%M:%S} UTC, with"
                f" {rows} (attempt {attempt} rejected)",
            )
            await asyncio.sleep(delay)
            asked_at = datetime.now(UTC)
        if attempts > 1:
            message = f"retraining did not beat the champion after {attempts} attempts: {last}"
            await self._notify(plan, model, champion.version, message)
        else:
            message = last
        await self._finish(job_id, "rejected", message)

    async def _prepare(
        self,
        job_id: int,
        model: str,
        champion: Champion,
        plan: Plan,
        alert_id: int,
        asked_at: datetime,
        fresh_wanted: int,
    ) -> Prepared | None:
        """The labelled window of one attempt, split into holdout and candidate windows;
        None when the job has ended (too few rows, or broken features)."""
        spec = plan.retrain
        auto: AutoWindow | None = None
        if spec.since_alert:
            window = await self._wait_for_fresh_rows(job_id, model, champion, plan, asked_at)
        elif spec.kind == "auto":
            window, auto = await self._auto_window(
                job_id, model, champion, plan, asked_at, fresh_wanted if alert_id else 0
            )
        else:
            window = await self._fetch(model, champion, plan)
        counts = window.rows
        fields: dict[str, Any] = {
            "window_rows": counts,
            "champion_version": champion.version,
            "family": spec.family,
        }
        if window.start is not None:
            fields.update(window_start=window.start, window_end=window.end)
        if auto is not None and auto.change is not None:
            broken = broken_features(window.frame, champion.features, auto.change.index)
            if broken:
                message = (
                    f"data fault, not retrained on broken rows ({auto.change.describe(counts)}):"
                    f" {'; '.join(broken)}"
                )
                await self._notify(plan, model, champion.version, message)
                await self._finish(job_id, "failed", message, **fields)
                return None
        if auto is not None and auto.change is not None and auto.fresh_rows < spec.min_rows:
            # Too few rows after the change to fit on them alone (a recent change and a job by
            # hand, or `wait` ran out): the whole window, which a retry may improve on.
            auto = plan_auto(counts, spec.holdout, None)
        if counts < spec.min_rows:
            await self._finish(
                job_id,
                "not_enough_data",
                f"{counts} labelled rows in the window, retrain.min_rows is {spec.min_rows}",
                **fields,
            )
            return None
        if auto is None:
            train_part, holdout_part = split_holdout(counts, spec.holdout)
            auto = AutoWindow(None, holdout_part, {"window": train_part})
            lineage: dict[str, Any] = {"kind": "since_alert" if spec.since_alert else spec.kind}
        else:
            lineage = auto.lineage(counts)
        holdout = window.frame.iloc[auto.holdout].reset_index(drop=True)
        trains = [
            (name, window.frame.iloc[rows].reset_index(drop=True))
            for name, rows in auto.candidates.items()
        ]
        if champion.task == "classification":
            usable = [(n, t) for n, t in trains if len(class_counts(t[LABEL])) >= 2]
            if not usable:
                classes = class_counts(trains[0][1][LABEL])
                raise JobFailure(
                    f"labels: the training rows have one class only ({classes}); "
                    "a classifier needs at least two"
                )
            trains = usable
        await self._update(
            job_id,
            stage="fit",
            train_rows=len(trains[0][1]),
            holdout_rows=len(holdout),
            **fields,
        )
        return Prepared(window, auto, trains, holdout, fields, lineage)

    async def _fit(
        self, job_id: int, model: str, champion: Champion, plan: Plan, prepared: Prepared
    ) -> FitOutcome:
        spec = plan.retrain
        metric = primary_metric(plan, champion.task)
        (first, train), *others = prepared.trains
        with telemetry.span("trainer.fit", attributes={"cyclone.train_rows": len(train)}):
            outcome: FitOutcome = await self._in_worker(
                fit_and_evaluate,
                FitTask(
                    model=model,
                    task=champion.task,  # type: ignore[arg-type]
                    features=champion.features,
                    train=train,
                    holdout=prepared.holdout,
                    champion_dir=str(champion.directory),
                    family=spec.family,
                    params=dict(spec.params),
                    metric=metric,
                    margin=spec.margin,
                    confidence=spec.confidence,
                    resamples=spec.resamples,
                    alternatives=tuple(others),
                    train_name=first,
                ),
            )
        await self._update(
            job_id,
            stage="evaluate",
            train_rows=outcome.train_rows or len(train),
            champion_metrics=outcome.champion_metrics,
            challenger_metrics=outcome.challenger_metrics,
            decision=f"{_window_text(outcome, prepared)}; {outcome.decision}",
        )
        return outcome

    async def _register(
        self,
        job_id: int,
        model: str,
        champion: Champion,
        plan: Plan,
        alert_id: int,
        prepared: Prepared,
        outcome: FitOutcome,
        roll_out: bool,
    ) -> None:
        spec = plan.retrain
        metric = primary_metric(plan, champion.task)
        window, holdout = prepared.window, prepared.holdout
        train_rows = outcome.train_rows
        window_lineage = {
            **prepared.lineage,
            "chosen": outcome.window,
            "candidates": outcome.candidates,
        }
        await self._update(job_id, stage="convert")
        version = await self._next_version(model)
        with telemetry.span("trainer.convert", attributes={"cyclone.version": version}):
            written = await self._in_worker(
                write_version,
                outcome.pipeline,
                model,
                str(self.repository),
                version,
                holdout,
                {"parent_version": champion.version, "training_job": job_id},
            )
        directory = Path(written.directory)
        try:
            await self._update(job_id, stage="register")
            await self.store.RegisterTrainedVersion(
                store_pb.RegisterTrainedVersionRequest(
                    job_id=job_id,
                    model_version=store_pb.ModelVersion(
                        model=model,
                        version=version,
                        artifact_uri=written.directory,
                        sha256=written.sha256,
                        schema_json=json.dumps(with_probes(written.schema, written.directory)),
                        task=champion.task,
                        parent_version=champion.version,
                        training_window_start=ts_or_none(window.start),
                        training_window_end=ts_or_none(window.end),
                        triggering_alert_id=alert_id,
                        evaluation_json=json.dumps(written.evaluation)
                        if written.evaluation
                        else "",
                        reference_profile_json=json.dumps(written.reference_profile)
                        if written.reference_profile
                        else "",
                        status=store_pb.MODEL_STATUS_STAGED,
                        training_rows=train_rows,
                        family=spec.family,
                        hyperparameters_json=json.dumps(outcome.hyperparameters),
                        holdout_metrics_json=json.dumps(
                            {
                                "metric": metric.result_key,
                                "holdout_rows": len(holdout),
                                "champion": outcome.champion_metrics,
                                "challenger": outcome.challenger_metrics,
                                "decision": outcome.decision_numbers,
                                "window": window_lineage,
                            }
                        ),
                    ),
                ),
                timeout=STORE_TIMEOUT,
            )
        except BaseException as exc:
            # Not registered: the directory must not stay behind as a half-made version.
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise _JobGone(exc.details()) from None
            raise
        if not roll_out:
            # Dispatched: the trainer that dispatched the job (it has the router) takes it on.
            await self._update(
                job_id,
                stage="rollout",
                message=f"version {version} registered; the dispatching trainer rolls it out",
            )
            log.info("job %d: version %s registered; handed back for the rollout", job_id, version)
            return
        await self._update(job_id, stage="rollout")
        await self._roll_out(
            job_id, model, version, f"{_window_text(outcome, prepared)}; {outcome.decision}"
        )

    async def _roll_out(self, job_id: int, model: str, version: str, decision: str) -> None:
        try:
            with telemetry.span("trainer.rollout", attributes={"cyclone.version": version}):
                rollout_id = await self.rollout(model, version, job_id)
        except Exception as exc:
            raise JobFailure(
                f"rollout: version {version} is registered (staged) but could not be rolled"
                f" out: {exc}"
            ) from None
        await self._finish(
            job_id,
            "succeeded",
            f"version {version} registered and handed to the rollout; {decision}",
            rollout_id=rollout_id,
        )

    # --- one job, run elsewhere -----------------------------------------------------------

    async def _run_remote(self, job_id: int, model: str, dispatcher: JobDispatcher) -> None:
        """Dispatch the queued job, follow it in the store till it ends or hands back its
        registered version, then roll that out here."""
        try:
            # Marked before the dispatch: the remote run reads it when it starts.
            await self._update(job_id, "queued", stage=DISPATCHED, message="dispatching")
        except _JobGone:
            return  # cancelled while queued
        try:
            remote = await dispatcher.dispatch(job_id, model)
        except Exception as exc:
            # "" = any unended state: a dispatch that timed out may still have started.
            await self._finish(job_id, "failed", f"dispatch: {exc}", expected="")
            return
        log.info("job %d of %s dispatched as %s", job_id, model, remote)
        with contextlib.suppress(_JobGone):
            await self._update(job_id, "", message=f"dispatched as nomad job {remote}")
        try:
            await self._follow(job_id, model, remote, dispatcher)
        except _JobGone as exc:
            log.info("job %d ended elsewhere (%s)", job_id, exc)
        except JobFailure as exc:
            await self._finish(job_id, "failed", str(exc), expected="")
        except grpc.aio.AioRpcError as exc:
            await self._finish(
                job_id, "failed", f"store: {exc.code().name}: {exc.details()}", expected=""
            )

    async def _follow(
        self, job_id: int, model: str, remote: str, dispatcher: JobDispatcher
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + await self._remote_limit(model)
        next_check = loop.time() + REMOTE_CHECK_SECONDS
        ended = ""
        while True:
            job = await self.get(job_id)
            if job.state in TERMINAL:
                log.info("job %d (%s) ended %s: %s", job_id, remote, job.state, job.message)
                return
            if job.state == "running" and job.stage == "rollout" and job.new_version:
                await self._roll_out(
                    job_id, model, job.new_version, f"{job.decision} (ran as {remote})"
                )
                return
            if ended:  # read the job once more after the run was over: it did not finish it
                raise JobFailure(
                    f"dispatch: nomad job {remote} ended ({ended}) without finishing the job"
                    f" (stage {job.stage}); see its allocation's logs"
                )
            if loop.time() >= next_check:
                next_check = loop.time() + REMOTE_CHECK_SECONDS
                ended = await dispatcher.ended(remote)
                continue
            if loop.time() >= deadline:
                raise JobFailure(
                    f"dispatch: nomad job {remote} did not finish within"
                    f" {self.remote_timeout:g} s (stage {job.stage})"
                )
            await asyncio.sleep(REMOTE_POLL_SECONDS)

    async def _remote_limit(self, model: str) -> float:
        """The plan's `retrain.wait` (a since-alert job waits for labels) plus the default."""
        try:
            champion = await self._champion(model)
            plan = await self._plan(model, champion.task)
        except (JobFailure, NotFound):
            return self.remote_timeout  # the remote run fails the job with the reason
        spec = plan.retrain
        waits = spec.since_alert or spec.kind == "auto"
        return self.remote_timeout + (spec.wait_seconds * spec.attempts if waits else 0)

    async def _champion(self, model: str) -> Champion:
        try:
            response = await self.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=model), timeout=STORE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model: {model!r} is not registered") from None
            raise
        mv = response.model_version
        schema = json.loads(mv.schema_json) if mv.schema_json else {}
        features = tuple(
            (str(f["name"]), "categorical" if f.get("kind") == "categorical" else "numeric")
            for f in schema.get("features", [])
        )
        if not features or mv.task not in ("classification", "regression"):
            raise JobFailure(f"model: {model!r} version {mv.version} has no usable schema")
        directory = (
            Path(mv.artifact_uri) if mv.artifact_uri else self.repository / model / mv.version
        )
        return Champion(mv.version, directory, mv.task, features)

    async def _plan(self, model: str, task: str) -> Plan:
        try:
            response = await self.store.GetPlan(
                store_pb.GetPlanRequest(model=model), timeout=STORE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return default_plan(model, task)  # type: ignore[arg-type]
            raise
        try:
            return parse_plan(response.plan_yaml)
        except PlanError as exc:
            raise JobFailure(f"plan: {'; '.join(exc.problems)}") from None

    async def _wait_for_fresh_rows(
        self, job_id: int, model: str, champion: Champion, plan: Plan, since: datetime
    ) -> LabelledWindow:
        """Rows predicted after `since`, once `min_rows` of them are labelled (labels arrive
        late), or whatever is there when `retrain.wait` runs out."""
        spec = plan.retrain
        deadline = since.timestamp() + spec.wait_seconds
        shown = -1
        while True:
            window = await self._fetch(model, champion, plan, since=since)
            if window.rows >= spec.min_rows or datetime.now(UTC).timestamp() >= deadline:
                return window
            if window.rows != shown:
                shown = window.rows
                await self._update(
                    job_id, stage=f"waiting for labels ({window.rows}/{spec.min_rows})"
                )
            await asyncio.sleep(FRESH_POLL_SECONDS)

    async def _auto_window(
        self,
        job_id: int,
        model: str,
        champion: Champion,
        plan: Plan,
        asked_at: datetime,
        fresh_wanted: int,
    ) -> tuple[LabelledWindow, AutoWindow]:
        """The newest rows cut at the loss's change point; waits (up to ``retrain.wait``) until
        ``fresh_wanted`` labelled rows came after the change: the new world must be seen
        before a model of it can beat the champion."""
        spec = plan.retrain
        deadline = asked_at.timestamp() + spec.wait_seconds
        shown = -1
        while True:
            window = await self._fetch(model, champion, plan)
            change, when = locate_change(window, champion.task)
            auto = plan_auto(window.rows, spec.holdout, change, when)
            fresh = auto.fresh_rows if change is not None else 0
            if (
                not fresh_wanted
                or change is None
                or fresh >= fresh_wanted
                or datetime.now(UTC).timestamp() >= deadline
            ):
                return window, auto
            if fresh != shown:
                shown = fresh
                await self._update(
                    job_id,
                    stage=f"waiting for labels after the change point ({fresh}/{fresh_wanted})",
                )
            await asyncio.sleep(FRESH_POLL_SECONDS)

    async def _rollout_in_progress(self, model: str) -> str:
        """ "rollout N of version V" when one of `model` is pending, progressing or paused."""
        response = await self.store.ListRollouts(
            store_pb.ListRolloutsRequest(model=model, active_only=True, limit=1),
            timeout=STORE_TIMEOUT,
        )
        for rollout in response.rollouts:
            return f"rollout {rollout.id} of version {rollout.to_version}"
        return ""

    async def _still_red(self, model: str, version: str) -> bool:
        """Whether `version` still serves `model` and the monitor last judged it RED."""
        response = await self.store.GetHealth(
            store_pb.GetHealthRequest(model=model), timeout=STORE_TIMEOUT
        )
        serving = await self._champion(model)
        if serving.version != version:
            return False
        return any(h.version == version and h.level == "RED" for h in response.health)

    async def _notify(self, plan: Plan, model: str, version: str, message: str) -> None:
        """Tell the plan's notify sinks what the trainer could not fix (best effort: the
        job's record keeps the message whatever happens to the delivery)."""
        sinks = get_plugins().alert_sinks
        alert = Alert(
            id=f"{model}-{version}-{uuid.uuid4().hex[:8]}",
            model=model,
            version=version,
            level="RED",
            previous_level="RED",
            reasons=[message],
            actions=["notify"],
            created_at=datetime.now(UTC),
        )
        for ref in plan.notify:
            sink = sinks.get(ref.sink)
            if sink is None:
                log.warning("notify sink %r of %s is not installed: %s", ref.sink, model, message)
                continue
            try:
                await asyncio.to_thread(sink.deliver, alert, dict(ref.config))
            except Exception as exc:
                log.warning("notify sink %r of %s failed: %s", ref.sink, model, exc)
        log.warning("%s %s: %s", model, version, message)

    async def _fetch(
        self, model: str, champion: Champion, plan: Plan, since: datetime | None = None
    ) -> LabelledWindow:
        request = window_request(model, plan.retrain, datetime.now(UTC), since=since)
        stream = self.store.GetTrainingData(request, timeout=STORE_TIMEOUT * 4)
        return await collect(stream, champion.features, champion.task)

    async def _next_version(self, model: str) -> str:
        response = await self.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(model=model), timeout=STORE_TIMEOUT
        )
        known = [v.version for v in response.model_versions]
        known += ModelRepository(self.repository).versions(model)
        if (self.repository / model).is_dir():
            known += [p.name for p in (self.repository / model).iterdir()]
        return str(max((int(v) for v in known if v.isdigit()), default=0) + 1)
