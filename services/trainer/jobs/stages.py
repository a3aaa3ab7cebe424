"""The stages of one job, in order: prepare the window (`retrain:`; `auto` cuts it at the loss's
change point and waits for the new world's labels), fit in a worker, evaluate against the
champion, register with lineage, hand to the rollout. Each stage records itself on the job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cyclone import telemetry
from cyclone.models.repository import ModelRepository
from cyclone.plan import Plan, primary_metric
from cyclone.plugin_api import Alert
from cyclone.plugins import get_plugins
from services.trainer.auto import (
    AutoWindow,
    broken_features,
    locate_change,
    novel_features,
    plan_auto,
)
from services.trainer.data import LabelledWindow
from services.trainer.evaluate import class_counts, split_holdout
from services.trainer.fit import LABEL, FitOutcome, FitTask, JobFailure

from .model import Champion, Job, JobGone, Prepared, TrainedVersion, window_text
from .ports import JobStore, RolloutStarter, Worker

log = logging.getLogger(__name__)

# How often a `since_alert` or `auto` job looks for newly labelled rows.
FRESH_POLL_SECONDS = 2.0
# Backoff before the second attempt of a rejected alert's job; doubles after each attempt.
RETRY_BACKOFF_SECONDS = 15.0


class JobStages:
    """One job of `model` as it runs: its stages over the store, a worker and the rollout.

    `owner` is the trainer holding the job's lease ("" for a run that does not own it, as a
    Nomad-dispatched one): every write is refused (`JobGone`) once another trainer took it."""

    def __init__(
        self,
        job_id: int,
        model: str,
        *,
        store: JobStore,
        worker: Worker | None,
        repository: Path,
        rollout: RolloutStarter,
        owner: str = "",
    ) -> None:
        self.job_id = job_id
        self.model = model
        self.store = store
        self._worker = worker
        self.repository = repository
        self.rollout = rollout
        self.owner = owner

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("JobRunner is not started")
        return self._worker

    # --- the job's record ----------------------------------------------------------------

    async def update(self, expected: str = "running", **fields: Any) -> Job:
        if "stage" in fields:
            telemetry.add_event(
                f"stage {fields['stage']}", {"cyclone.state": fields.get("state", expected)}
            )
        return await self.store.update(self.job_id, expected=expected, owner=self.owner, **fields)

    async def finish(
        self, state: str, message: str, expected: str = "running", **fields: Any
    ) -> None:
        trace_id = telemetry.current_trace_id()
        if trace_id:
            message = f"{message} (trace {trace_id})"
        with contextlib.suppress(JobGone):
            await self.update(
                expected,
                state=state,
                stage="done",
                message=message,
                finished_at=datetime.now(UTC),
                **fields,
            )
        log.info("job %d: %s: %s", self.job_id, state, message)

    # --- the attempts ---------------------------------------------------------------------

    async def execute(self, alert_id: int, asked_at: datetime, roll_out: bool = True) -> None:
        """Every stage; retries a rejected alert's challenger while the model stays RED."""
        champion = await self.store.champion(self.model)
        rolling = await self.store.active_rollout(self.model)
        if rolling and roll_out:
            # The answer to this alert may already be on its way; a challenger fitted now
            # could not be rolled out anyway (one rollout per model).
            await self.finish("cancelled", f"{rolling} is in progress: retrain after it")
            return
        plan = await self.store.plan(self.model, champion.task)
        spec = plan.retrain
        auto = spec.kind == "auto" and not spec.since_alert
        # Retries only for what an alert asked: a rejected challenger while the model is RED.
        attempts = spec.attempts if auto and alert_id else 1
        fresh_wanted = spec.fresh_rows
        last = ""
        for attempt in range(1, attempts + 1):
            prepared = await self.prepare(champion, plan, alert_id, asked_at, fresh_wanted)
            if prepared is None:
                return  # finished: not enough data, or a data fault
            outcome = await self.fit(champion, plan, prepared)
            if outcome.promote:
                await self.register(champion, plan, alert_id, prepared, outcome, roll_out)
                return
            last = f"{window_text(outcome, prepared)}; {outcome.decision}"
            if attempt == attempts:
                break
            if not await self._still_red(champion.version):
                await self.finish("rejected", f"{last}; the model is no longer RED")
                return
            # The next challenger needs new rows of the new world: twice as many after the
            # change, and a backoff that doubles, both bounded by retrain.wait.
            delay = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
            next_at = datetime.now(UTC) + timedelta(seconds=delay)
            rows = "the rows labelled by then"
            if prepared.auto.change is not None:
                fresh_wanted = max(fresh_wanted, 2 * prepared.fresh)
                rows = f"{fresh_wanted} labelled rows after the change"
            await self.update(
                stage=f"attempt {attempt + 1}/{attempts} at {next_at:%H:%M:%S} UTC, with"
                f" {rows} (attempt {attempt} rejected)",
            )
            await asyncio.sleep(delay)
            asked_at = datetime.now(UTC)
        if attempts > 1:
            message = f"retraining did not beat the champion after {attempts} attempts: {last}"
            await self.notify(plan, champion.version, message)
        else:
            message = last
        await self.finish("rejected", message)

    # --- prepare the window ---------------------------------------------------------------

    async def prepare(
        self,
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
            window = await self._wait_for_fresh_rows(champion, plan, asked_at)
        elif spec.kind == "auto":
            window, auto = await self._auto_window(
                champion, plan, asked_at, fresh_wanted if alert_id else 0
            )
        else:
            window = await self.store.window(self.model, champion, plan)
        counts = window.rows
        fields: dict[str, Any] = {
            "window_rows": counts,
            "champion_version": champion.version,
            "family": spec.family,
        }
        if window.start is not None:
            fields.update(window_start=window.start, window_end=window.end)
        novel: list[str] = []
        if auto is not None and auto.change is not None:
            broken = broken_features(window.frame, champion.features, auto.change.index)
            if broken:
                message = (
                    f"data fault, not retrained on broken rows ({auto.change.describe(counts)}):"
                    f" {'; '.join(broken)}"
                )
                await self.notify(plan, champion.version, message)
                await self.finish("failed", message, **fields)
                return None
            novel = novel_features(window.frame, champion.features, auto.change.index)
        if auto is not None and auto.change is not None and auto.fresh_rows < spec.min_rows:
            # Too few rows after the change to fit on them alone (a recent change and a job by
            # hand, or `wait` ran out): the whole window, which a retry may improve on.
            auto = plan_auto(counts, spec.holdout, None)
        if counts < spec.min_rows:
            await self.finish(
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
        if novel:
            lineage["novel_values"] = novel
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
        await self.update(
            stage="fit", train_rows=len(trains[0][1]), holdout_rows=len(holdout), **fields
        )
        return Prepared(window, auto, trains, holdout, fields, lineage)

    async def _wait_for_fresh_rows(
        self, champion: Champion, plan: Plan, since: datetime
    ) -> LabelledWindow:
        """Rows predicted after `since`, once `min_rows` of them are labelled (labels arrive
        late), or whatever is there when `retrain.wait` runs out."""
        spec = plan.retrain
        deadline = since.timestamp() + spec.wait_seconds
        shown = -1
        while True:
            window = await self.store.window(self.model, champion, plan, since=since)
            if window.rows >= spec.min_rows or datetime.now(UTC).timestamp() >= deadline:
                return window
            if window.rows != shown:
                shown = window.rows
                await self.update(stage=f"waiting for labels ({window.rows}/{spec.min_rows})")
            await asyncio.sleep(FRESH_POLL_SECONDS)

    async def _auto_window(
        self, champion: Champion, plan: Plan, asked_at: datetime, fresh_wanted: int
    ) -> tuple[LabelledWindow, AutoWindow]:
        """The newest rows cut at the loss's change point; waits (up to ``retrain.wait``) until
        ``fresh_wanted`` labelled rows came after the change: the new world must be seen
        before a model of it can beat the champion."""
        spec = plan.retrain
        deadline = asked_at.timestamp() + spec.wait_seconds
        shown = -1
        while True:
            window = await self.store.window(self.model, champion, plan)
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
                await self.update(
                    stage=f"waiting for labels after the change point ({fresh}/{fresh_wanted})"
                )
            await asyncio.sleep(FRESH_POLL_SECONDS)

    # --- fit and evaluate -----------------------------------------------------------------

    async def fit(self, champion: Champion, plan: Plan, prepared: Prepared) -> FitOutcome:
        """Fit the candidates in a worker and compare the best with the champion on the
        holdout (the worker does both: the pipelines stay there)."""
        spec = plan.retrain
        metric = primary_metric(plan, champion.task)
        (first, train), *others = prepared.trains
        with telemetry.span("trainer.fit", attributes={"cyclone.train_rows": len(train)}):
            outcome = await self.worker.fit(
                FitTask(
                    model=self.model,
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
                )
            )
        await self.update(
            stage="evaluate",
            train_rows=outcome.train_rows or len(train),
            champion_metrics=outcome.champion_metrics,
            challenger_metrics=outcome.challenger_metrics,
            decision=f"{window_text(outcome, prepared)}; {outcome.decision}",
        )
        return outcome

    # --- register --------------------------------------------------------------------------

    async def register(
        self,
        champion: Champion,
        plan: Plan,
        alert_id: int,
        prepared: Prepared,
        outcome: FitOutcome,
        roll_out: bool,
    ) -> None:
        """Convert, write the version directory (atomically), register it with its lineage in
        one store transaction, then roll it out (or, dispatched, hand it back)."""
        metric = primary_metric(plan, champion.task)
        window, holdout = prepared.window, prepared.holdout
        await self.update(stage="convert")
        version = await self._next_version()
        with telemetry.span("trainer.convert", attributes={"cyclone.version": version}):
            written = await self.worker.write_version(
                outcome.pipeline,
                self.model,
                str(self.repository),
                version,
                holdout,
                {"parent_version": champion.version, "training_job": self.job_id},
            )
        trained = TrainedVersion(
            model=self.model,
            version=version,
            directory=written.directory,
            sha256=written.sha256,
            schema=written.schema,
            task=champion.task,
            parent_version=champion.version,
            window_start=window.start,
            window_end=window.end,
            alert_id=alert_id,
            evaluation=written.evaluation,
            reference_profile=written.reference_profile,
            training_rows=outcome.train_rows,
            family=plan.retrain.family,
            hyperparameters=outcome.hyperparameters,
            holdout_metrics={
                "metric": metric.result_key,
                "holdout_rows": len(holdout),
                "champion": outcome.champion_metrics,
                "challenger": outcome.challenger_metrics,
                "decision": outcome.decision_numbers,
                "window": {
                    **prepared.lineage,
                    "chosen": outcome.window,
                    "candidates": outcome.candidates,
                },
            },
        )
        try:
            await self.update(stage="register")
            await self.store.register(self.job_id, trained)
        except BaseException:
            # Not registered: the directory must not stay behind as a half-made version.
            shutil.rmtree(Path(written.directory), ignore_errors=True)
            raise
        if not roll_out:
            # Dispatched: the trainer that dispatched the job (it has the router) takes it on.
            await self.update(
                stage="rollout",
                message=f"version {version} registered; the dispatching trainer rolls it out",
            )
            log.info(
                "job %d: version %s registered; handed back for the rollout", self.job_id, version
            )
            return
        await self.update(stage="rollout")
        await self.roll_out(version, f"{window_text(outcome, prepared)}; {outcome.decision}")

    async def _next_version(self) -> str:
        known = await self.store.versions(self.model)
        known += ModelRepository(self.repository).versions(self.model)
        if (self.repository / self.model).is_dir():
            known += [p.name for p in (self.repository / self.model).iterdir()]
        return str(max((int(v) for v in known if v.isdigit()), default=0) + 1)

    # --- hand to the rollout ----------------------------------------------------------------

    async def roll_out(self, version: str, decision: str) -> None:
        try:
            with telemetry.span("trainer.rollout", attributes={"cyclone.version": version}):
                rollout_id = await self.rollout(self.model, version, self.job_id)
        except Exception as exc:
            raise JobFailure(
                f"rollout: version {version} is registered (staged) but could not be rolled"
                f" out: {exc}"
            ) from None
        await self.finish(
            "succeeded",
            f"version {version} registered and handed to the rollout; {decision}",
            rollout_id=rollout_id,
        )

    # --- what the trainer could not fix ---------------------------------------------------

    async def _still_red(self, version: str) -> bool:
        """Whether `version` still serves the model and the monitor last judged it RED."""
        levels = await self.store.levels(self.model)
        serving = await self.store.champion(self.model)
        return serving.version == version and levels.get(version) == "RED"

    async def notify(self, plan: Plan, version: str, message: str) -> None:
        """Tell the plan's notify sinks what the trainer could not fix (best effort: the
        job's record keeps the message whatever happens to the delivery)."""
        sinks = get_plugins().alert_sinks
        alert = Alert(
            id=f"{self.model}-{version}-{uuid.uuid4().hex[:8]}",
            model=self.model,
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
                log.warning(
                    "notify sink %r of %s is not installed: %s", ref.sink, self.model, message
                )
                continue
            try:
                await asyncio.to_thread(sink.deliver, alert, dict(ref.config))
            except Exception as exc:
                log.warning("notify sink %r of %s failed: %s", ref.sink, self.model, exc)
        log.warning("%s %s: %s", self.model, version, message)
