"""The monitor's engine: plans on their schedule, windows from the store, levels, alerts.

Everything persistent lives in the store (plans, metric history, current level, the
alert outbox), reached only through its gRPC API; this process keeps the latest
evaluation per model in memory for GetStatus and WatchStatus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Gauge, Histogram

from cyclone import telemetry, wire
from cyclone.channels import aio_channel
from cyclone.errors import InvalidArgument, NotFound
from cyclone.plan import (
    Plan,
    PlanError,
    Registry,
    default_plan,
    parse_plan,
    plan_to_yaml,
    task_problems,
)
from cyclone.plugin_api import Window
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor import convert, probes
from services.monitor.evaluate import Evaluation, ProbeSummary, evaluate, with_probes
from services.monitor.records import AlertTarget, MetricPoint, ModelInfo, ModelStatus, QueuedAlert
from services.monitor.window import window_from_chunks

log = logging.getLogger(__name__)

HEALTH = Gauge(
    "cyclone_model_health_level", "RAG level: 0 green, 1 amber, 2 red", ["model", "version"]
)
METRIC = Gauge(
    "cyclone_model_metric", "Latest monitored metric value", ["model", "version", "metric"]
)
DRIFTED = Gauge(
    "cyclone_model_drifted_features", "Features flagged by any drift test", ["model", "version"]
)
EVALUATION_LAG = Histogram(
    "cyclone_monitor_evaluation_lag_seconds",
    "Seconds between a scheduled evaluation's due time and its start",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
OVERDUE = Gauge(
    "cyclone_monitor_overdue_seconds",
    "How long the most overdue model has been due without starting (0: none), at the last tick",
)
LEASED = Gauge(
    "cyclone_monitor_leased_models", "Models this monitor holds the lease of (evaluates)"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How long a model's lease lasts unless renewed (each tick renews it): a monitor that dies
# hands its models to the others this long after its last tick at the latest.
DEFAULT_LEASE_SECONDS = 10
# With other monitors evaluating some of the models, their latest levels are read from the
# store this often, so this monitor's status and dashboard still show every model.
PEER_STATUS_SECONDS = 5.0
# Evaluations in flight at once unless configured: enough to overlap store reads with the
# numpy work of others, few enough that a burst of due models does not swamp the store.
DEFAULT_CONCURRENT_EVALUATIONS = 8
# A full ListModelVersions (start-up, or many new versions) answers with every version's schema
# and reference profile (~12 KB for a small tabular model): past ~300 models that is more than
# gRPC's default 4 MB per message. Ticks list identities only.
STORE_CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 256 * 1024 * 1024),)
# More versions new to the monitor than this in one tick (start-up): their full records come
# in one listing of the serving versions instead of one GetModelVersion each.
FULL_LISTING_ABOVE = 32
# While a model has not answered its first probe, rounds come this often (at most).
STARTING_PROBE_SECONDS = 5.0


def default_holder() -> str:
    """This process's lease holder id: host and pid for people, a random part so a restarted
    process (same pid in a container) is never taken for the one before."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _version_key(mv: store_pb.ModelVersion) -> tuple[str, str, str]:
    """Which record of a version: model, version and sha256 (a model removed and registered
    again under the same version name is another artifact)."""
    return mv.model, mv.version, mv.sha256


def status_from_evaluation(
    model: str, version: str, ev: Evaluation, revision: int, at: datetime
) -> ModelStatus:
    return ModelStatus(model, version, ev, revision, at)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metric_points(status: ModelStatus) -> list[MetricPoint]:
    """History of one evaluation: one point per metric, per drift result, and the level."""
    at, ev = status.evaluated_at, status.evaluation
    points = [
        MetricPoint(
            at,
            name,
            result.value,
            {"status": result.status, "detail": result.detail} if result.status != "ok" else None,
        )
        for name, result in ev.metrics.items()
    ]
    for test, per_feature in ev.drift.items():
        for feature, d in per_feature.items():
            # A skipped test (too few rows) has NaN statistics: not JSON, so stored as null.
            details = {
                "statistic": _finite(d.statistic),
                "drifted": d.drifted,
                "threshold": _finite(d.threshold),
            }
            points.append(
                MetricPoint(at, f"drift.{test}.{feature}", _finite(d.effect_size), details)
            )
    points.append(MetricPoint(at, "level", float(ev.level.rank)))
    return points


def window_bounds(
    info: ModelInfo, plan: Plan, now: datetime
) -> tuple[datetime | None, datetime | None, int]:
    """(start, end, last N rows or 0) of the plan's window; None for an open end."""
    rows = plan.window.rows or 0
    if plan.window.kind == "expanding":
        return info.created_at or _EPOCH, now + timedelta(seconds=1), rows
    if plan.window.duration_seconds:
        start = now - timedelta(seconds=plan.window.duration_seconds)
        return start, now + timedelta(seconds=1), rows
    return None, None, rows


class Monitor:
    def __init__(
        self,
        store_address: str,
        *,
        record_path: Path,
        trainer: str = "",
        tick_seconds: float = 1.0,
        request_timeout: float = 30.0,
        probe_address: str = "",
        probe_grace_seconds: float = 60.0,
        probe_retry_seconds: float = 1.0,
        max_concurrent_evaluations: int = DEFAULT_CONCURRENT_EVALUATIONS,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        holder: str = "",
    ) -> None:
        if max_concurrent_evaluations < 1:
            raise ValueError(
                f"max_concurrent_evaluations: must be at least 1, got {max_concurrent_evaluations}"
            )
        self.store_address = store_address
        self.record_path = record_path
        # Where retrain/rollback requests go; empty: recorded durably in `record_path`.
        self.trainer = trainer
        self.tick_seconds = tick_seconds
        self.request_timeout = request_timeout
        self.statuses: dict[str, ModelStatus] = {}
        self._subscribers: set[asyncio.Queue[ModelStatus]] = set()
        # Per model: when its next evaluation is due (monotonic); absent: due now.
        self._next_due: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Scheduled rounds in flight (at most one per model) and the slots bounding them.
        self.max_concurrent_evaluations = max_concurrent_evaluations
        self._slots = asyncio.Semaphore(max_concurrent_evaluations)
        self._rounds: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, float] = {}  # model -> due time, while it waits for a slot
        self.lags: deque[float] = deque(maxlen=10_000)  # recent lags (seconds), newest last
        # Serving versions as last listed (reference profiles parsed once per version) and
        # stored plans parsed once per text: the schedule re-reads neither every round.
        self._infos: dict[tuple[str, str, str], ModelInfo] = {}
        self._plans: dict[str, tuple[str, Plan]] = {}
        self._channel: aio.Channel | None = None
        self._store: store_grpc.StoreServiceStub | None = None
        self._task: asyncio.Task[None] | None = None
        self.dashboard: Any = None  # set by the server builder when the dashboard is on
        # Where known-answer probes go when the plan names no `probes.address`; empty: nowhere.
        self.probe_address = probe_address
        self.probe_records: dict[str, probes.ProbeRecord] = {}
        self._next_probe: dict[str, float] = {}
        self._probe_channels: dict[str, aio.Channel] = {}
        self._known_answers: dict[tuple[str, str], probes.KnownAnswers | None] = {}
        # "No answer" counts only for a model that answered once since this monitor started, or
        # that stayed unanswered longer than the grace: a starting mesh is not an outage.
        self.probe_grace_seconds = probe_grace_seconds
        self.probe_retry_seconds = probe_retry_seconds  # one retry after a transient status
        self._probe_answered: set[str] = set()
        self._unanswered_since: dict[str, float] = {}
        # Model leases (the store shares the models among the live monitors): the schedule
        # evaluates only the models leased here, each until its lease ends by this process's
        # clock (counted from before the call that renewed it, so never after the store's).
        if lease_seconds < 1:
            raise ValueError(f"lease_seconds: must be at least 1, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self.holder = holder or default_holder()
        self._leases: dict[str, float] = {}  # model -> monotonic end of its lease
        # Models just taken from another holder: when that one last evaluated them, so their
        # schedule carries on instead of evaluating at once (no model evaluated twice).
        self._taken_over: dict[str, datetime] = {}

    @property
    def store(self) -> store_grpc.StoreServiceStub:
        assert self._store is not None, "Monitor.start() first"
        return self._store

    async def start(self, *, schedule: bool = True) -> None:
        self._channel = aio_channel(self.store_address, options=STORE_CHANNEL_OPTIONS)
        self._store = store_grpc.StoreServiceStub(self._channel)
        if schedule:
            self._task = asyncio.create_task(self._schedule(), name="monitor-schedule")

    async def stop(self) -> None:
        scheduled = self._task is not None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        rounds = list(self._rounds.values())
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
        if scheduled:
            await self._release_leases()
        for channel in self._probe_channels.values():
            await channel.close()
        if self._channel is not None:
            await self._channel.close()

    # -- plans --------------------------------------------------------------------------------

    async def plan_for(self, model: str, task: str) -> tuple[Plan, int]:
        """The model's stored plan, or the default for its task (revision 0)."""
        try:
            stored = await self.store.GetPlan(
                store_pb.GetPlanRequest(model=model), timeout=self.request_timeout
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return default_plan(
                model, "classification" if task == "classification" else "regression"
            ), 0
        try:
            return self._parsed(model, stored.plan_yaml), stored.revision
        except PlanError as exc:
            # A plan valid when saved can turn invalid if a plugin was removed since.
            log.error(
                "stored plan of %s (revision %d) is no longer valid: %s",
                model,
                stored.revision,
                exc,
            )
            return default_plan(
                model, "classification" if task == "classification" else "regression"
            ), 0

    def _parsed(self, model: str, plan_yaml: str) -> Plan:
        """The stored plan parsed; the text is read every round, parsed only when it changed."""
        cached = self._plans.get(model)
        if cached is not None and cached[0] == plan_yaml:
            return cached[1]
        plan = parse_plan(plan_yaml, Registry.from_plugins())
        self._plans[model] = (plan_yaml, plan)
        return plan

    async def set_plan(self, model: str, plan_yaml: str) -> int:
        if not model:
            raise InvalidArgument("model: empty")
        try:
            plan = parse_plan(plan_yaml, Registry.from_plugins())
        except PlanError as exc:
            raise InvalidArgument("plan_yaml: " + "; ".join(exc.problems)) from None
        if plan.model and plan.model != model:
            raise InvalidArgument(
                f"plan_yaml: model: the plan is for {plan.model!r}, not {model!r}"
            )
        info = await self._model_version(model)  # a plan for an unknown model is a typo
        problems = task_problems(replace(plan, model=model), info.task)
        if problems:
            raise InvalidArgument("plan_yaml: " + "; ".join(problems))
        response = await self.store.SavePlan(
            store_pb.SavePlanRequest(model=model, plan_yaml=plan_yaml), timeout=self.request_timeout
        )
        self._next_due.pop(model, None)
        return int(response.revision)

    async def get_plan_yaml(self, model: str) -> tuple[str, int]:
        mv = await self._model_version(model)
        plan, revision = await self.plan_for(model, mv.task)
        if revision:
            stored = await self.store.GetPlan(
                store_pb.GetPlanRequest(model=model), timeout=self.request_timeout
            )
            return stored.plan_yaml, revision
        return plan_to_yaml(plan), 0

    # -- evaluation ---------------------------------------------------------------------------

    async def _model_version(self, model: str) -> ModelInfo:
        if not model:
            raise InvalidArgument("model: empty")
        try:
            response = await self.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=model), timeout=self.request_timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model: {model!r} is not registered{await self._known()}") from None
            raise
        return convert.model_info_from_store(response.model_version)

    async def _known(self) -> str:
        """ "; registered models: a, b" for a NOT_FOUND message (a typo is the usual cause)."""
        listed = await self.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(summary=True), timeout=self.request_timeout
        )
        names = sorted({v.model for v in listed.model_versions})
        return f"; registered models: {', '.join(names)}" if names else "; no model is registered"

    async def evaluate_model(
        self,
        model: str,
        *,
        info: ModelInfo | None = None,
        plan: tuple[Plan, int] | None = None,
        fenced: bool = False,
    ) -> tuple[ModelStatus, list[int]]:
        """Evaluate `model` now. The schedule passes the version and plan it already holds;
        without them both are read from the store. `fenced`: recorded only while this monitor
        holds the model's lease (the store refuses it otherwise)."""
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            # Its alerts keep this span's trace: their delivery and any retrain continue it.
            with telemetry.span("monitor.evaluate", attributes={"cyclone.model": model}):
                return await self._evaluate(model, info, plan, fenced)

    async def read_window(self, info: ModelInfo, plan: Plan) -> Window:
        """The plan's window of `info`'s version: one GetTrainingData stream."""
        start, end, last_n = window_bounds(info, plan, datetime.now(UTC))
        request = convert.training_request(info, start, end, last_n)
        chunks = [
            convert.window_chunk_from_store(c, info.task)
            async for c in self.store.GetTrainingData(request, timeout=self.request_timeout)
        ]
        return window_from_chunks(chunks, info.task)

    async def _evaluate(
        self,
        model: str,
        info: ModelInfo | None,
        planned: tuple[Plan, int] | None,
        fenced: bool = False,
    ) -> tuple[ModelStatus, list[int]]:
        if info is None:
            info = await self._model_version(model)
        plan, revision = planned or await self.plan_for(model, info.task)
        window = await self.read_window(info, plan)
        # Metric plugins are numpy-bound; keep the event loop free for RPCs meanwhile.
        ev = await asyncio.to_thread(evaluate, plan, window, info.reference, dict(info.baseline))
        ev = with_probes(ev, self._probe_summary(model), plan)
        status = status_from_evaluation(model, info.version, ev, revision, datetime.now(UTC))
        record = convert.evaluation_to_store(
            status, metric_points(status), self._alerts_for(plan, ev)
        )
        if fenced:
            record.lease_holder = self.holder
        traceparent = telemetry.current_traceparent()
        for alert in record.alerts:
            alert.traceparent = traceparent
        response = await self.store.RecordEvaluation(record, timeout=self.request_timeout)
        outcome = convert.outcome_from_store(response)
        if outcome.level_changed:
            log.warning(
                "%s %s: %s -> %s (%s); %d alert(s) queued",
                model,
                info.version,
                outcome.previous_level or "-",
                ev.level.value,
                "; ".join(ev.reasons) or "no reasons",
                len(outcome.alert_ids),
            )
        self._publish(status)
        return status, outcome.alert_ids

    def _alerts_for(self, plan: Plan, ev: Evaluation) -> list[AlertTarget]:
        """One outbox row per (action, sink): each is delivered and retried on its own."""
        targets: list[AlertTarget] = []
        for action in ev.actions:
            if action == "notify" and plan.notify:
                targets.extend(AlertTarget(action, s.sink, dict(s.config)) for s in plan.notify)
            elif self.trainer and action in ("retrain", "rollback"):
                targets.append(AlertTarget(action, "trainer", {"address": self.trainer}))
            else:
                # Without a trainer, retrain/rollback requests are recorded durably.
                targets.append(AlertTarget(action, "record", {"path": str(self.record_path)}))
        return targets

    def _publish(self, status: ModelStatus, *, peer: bool = False) -> None:
        """Show `status`; the gauges only for this monitor's own evaluations (`peer`: another
        monitor's, which exports them itself)."""
        ev = status.evaluation
        self.statuses[status.model] = status
        for queue in self._subscribers:
            queue.put_nowait(status)
        if peer:
            return
        HEALTH.labels(status.model, status.version).set(ev.level.rank)
        for name, result in ev.metrics.items():
            if result.value is not None:
                METRIC.labels(status.model, status.version, name).set(result.value)
        DRIFTED.labels(status.model, status.version).set(len(ev.drifted.get("any", ())))

    async def watch(self, model: str) -> AsyncIterator[ModelStatus]:
        queue: asyncio.Queue[ModelStatus] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            for status in list(self.statuses.values()):
                if not model or status.model == model:
                    yield status
            while True:
                status = await queue.get()
                if not model or status.model == model:
                    yield status
        finally:
            self._subscribers.discard(queue)

    def latest(self, model: str) -> list[ModelStatus]:
        """The latest status of every model (or of `model`), by model name."""
        return [s for m, s in sorted(self.statuses.items()) if not model or m == model]

    # -- alerts -------------------------------------------------------------------------------

    async def list_alerts(self, model: str, status: str, limit: int) -> list[QueuedAlert]:
        response = await self.store.ListAlerts(
            store_pb.ListAlertsRequest(model=model, status=status, limit=limit), timeout=10
        )
        return [convert.alert_from_store(a) for a in response.alerts]

    async def acknowledge_alert(self, alert_id: int) -> QueuedAlert:
        response = await self.store.AcknowledgeAlert(
            store_pb.AcknowledgeAlertRequest(alert_id=alert_id), timeout=10
        )
        return convert.alert_from_store(response.alert)

    # -- schedule ------------------------------------------------------------------------------

    async def _monitored_models(self) -> dict[str, ModelInfo]:
        """Every serving version, by model. The tick lists identities only (no schema or
        reference profile); a version's full record is fetched and parsed once, when it is
        new here (versions never change but for their status, which the listing filters)."""
        response = await self.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(status=store_pb.MODEL_STATUS_SERVING, summary=True),
            timeout=self.request_timeout,
        )
        serving = convert.serving_versions(response.model_versions)
        new = [mv for mv in serving if _version_key(mv) not in self._infos]
        for mv in await self._full_versions(new):
            self._infos[_version_key(mv)] = convert.model_info_from_store(mv)
        listed = {
            mv.model: self._infos[_version_key(mv)]
            for mv in serving
            if _version_key(mv) in self._infos
        }
        for key in [k for k in self._infos if listed.get(k[0]) is not self._infos[k]]:
            del self._infos[key]  # retired versions, removed models
        return listed

    async def _full_versions(
        self, wanted: list[store_pb.ModelVersion]
    ) -> list[store_pb.ModelVersion]:
        """Full records of `wanted`: one call per version when few are new (a retrain), one
        listing of every serving version when many are (start-up)."""
        if not wanted:
            return []
        if len(wanted) > FULL_LISTING_ABOVE:
            response = await self.store.ListModelVersions(
                store_pb.ListModelVersionsRequest(status=store_pb.MODEL_STATUS_SERVING),
                timeout=self.request_timeout,
            )
            keys = {_version_key(mv) for mv in wanted}
            return [mv for mv in response.model_versions if _version_key(mv) in keys]
        responses = await asyncio.gather(
            *(
                self.store.GetModelVersion(
                    store_pb.GetModelVersionRequest(model=mv.model, version=mv.version),
                    timeout=self.request_timeout,
                )
                for mv in wanted
            ),
            return_exceptions=True,
        )
        full = []
        for response in responses:
            if isinstance(response, grpc.RpcError) and response.code() == grpc.StatusCode.NOT_FOUND:
                continue  # removed since the listing: gone at the next tick too
            if isinstance(response, BaseException):
                raise response
            full.append(response.model_version)
        keys = {_version_key(mv) for mv in wanted}
        return [mv for mv in full if _version_key(mv) in keys]  # changed since: next tick

    # -- leases: which models this monitor evaluates ---------------------------------------

    def holds(self, model: str) -> bool:
        """True while this monitor's lease on `model` has not ended."""
        return self._leases.get(model, -math.inf) > time.monotonic()

    async def lease(self, models: dict[str, ModelInfo]) -> dict[str, ModelInfo]:
        """Renew this monitor's leases and take its share of `models` (one store call); the
        models it holds now. A lease lost (taken by no one else before it ended: released
        to rebalance, or the store says so) stops that model's round at once."""
        asked = time.monotonic()
        response = await self.store.LeaseModels(
            store_pb.LeaseModelsRequest(
                holder=self.holder, models=sorted(models), lease_seconds=self.lease_seconds
            ),
            timeout=min(self.request_timeout, self.lease_seconds / 2),
        )
        until = asked + self.lease_seconds
        held = {lease.model for lease in response.leases}
        self._end_leases([m for m in self._leases if m not in held])
        for lease in response.leases:
            self._leases[lease.model] = until
            last = wire.from_ts(lease, "last_evaluated_at")
            if lease.acquired and last is not None:
                self._taken_over[lease.model] = last
        LEASED.set(len(self._leases))
        return {m: info for m, info in models.items() if m in held}

    def _end_expired_leases(self) -> None:
        now = time.monotonic()
        self._end_leases([m for m, until in self._leases.items() if until <= now])

    def _end_leases(self, models: list[str]) -> None:
        """Stop evaluating `models`: their rounds in flight are cancelled (nothing recorded
        after the lease ended), their schedule forgotten."""
        for model in models:
            log.info("%s: lease ended; another monitor evaluates it", model)
            self._leases.pop(model, None)
            self._taken_over.pop(model, None)
            self._next_due.pop(model, None)
            self._waiting.pop(model, None)
            task = self._rounds.pop(model, None)  # gone now: not overdue, not in a round
            if task is not None:
                task.cancel()
        if models:
            LEASED.set(len(self._leases))

    async def follow_peers(self, listed: dict[str, ModelInfo]) -> None:
        """Statuses of the serving models other monitors evaluate, from the store's health:
        published (status, dashboard) when newer than what this monitor shows."""
        response = await self.store.GetHealth(
            store_pb.GetHealthRequest(), timeout=self.request_timeout
        )
        for health in response.health:
            info = listed.get(health.model)
            if info is None or info.version != health.version:
                continue
            status = convert.status_from_health(health)
            shown = self.statuses.get(health.model)
            # A model held here shows this monitor's own (fuller) evaluation once it has one.
            newer = shown is None or (
                not self.holds(health.model) and shown.evaluated_at < status.evaluated_at
            )
            if newer:
                self._publish(status, peer=True)

    async def _release_leases(self) -> None:
        """On a clean stop: hand the models to the other monitors now, not at expiry."""
        if not self._leases or self._store is None:
            return
        try:
            await self.store.ReleaseModelLeases(
                store_pb.ReleaseModelLeasesRequest(holder=self.holder), timeout=5
            )
        except grpc.RpcError as exc:
            log.warning("could not release model leases (%s); they expire", exc.code().name)
        self._leases.clear()
        LEASED.set(0)

    async def run_due(self) -> None:
        """Probe and evaluate every serving model whose plan is due; return when all are done.

        A probe round whose verdict changed (a wrong answer, or no answer, or back to right)
        makes the model's evaluation due at once, so the level follows within one round.
        """
        models = await self.lease(await self._monitored_models())
        # A round whose lease ended meanwhile is cancelled: that model is another monitor's.
        await asyncio.gather(*self._start_due(models), return_exceptions=True)

    def _start_due(self, models: dict[str, ModelInfo]) -> list[asyncio.Task[None]]:
        """Start a round for every due model not already in one; at most
        `max_concurrent_evaluations` run at once, the others wait for a slot. A model whose
        round is slow delays only its own next round."""
        now = time.monotonic()
        started = []
        for model, info in models.items():
            if model in self._rounds:
                continue
            due = self._next_due.setdefault(model, now)  # a model seen first is due now
            probe_due = self._next_probe.get(model, 0.0) <= now
            if not (due <= now or probe_due):
                continue
            self._waiting[model] = min(due, now)
            task = asyncio.create_task(
                self._round(info, due if due <= now else None, probe_due),
                name=f"monitor-round-{model}",
            )
            self._rounds[model] = task
            started.append(task)
        OVERDUE.set(self.overdue_seconds(now))
        return started

    def _earliest_due(self, models: dict[str, ModelInfo]) -> float:
        """When the next round of a model not in one is due (inf: none)."""
        now = time.monotonic()
        return min(
            (
                min(self._next_due.get(m, now), self._next_probe.get(m, now))
                for m in models
                if m not in self._rounds
            ),
            default=math.inf,
        )

    def overdue_seconds(self, now: float | None = None) -> float:
        """How long the most overdue model has been due without its round starting: waiting
        for a slot, or still in its previous round past its next due time (0: none)."""
        now = time.monotonic() if now is None else now
        dues = list(self._waiting.values())
        dues += [self._next_due[m] for m in self._rounds if m not in self._waiting]
        return max((now - due for due in dues if due < now), default=0.0)

    async def _round(self, info: ModelInfo, due: float | None, probe_due: bool) -> None:
        """One model's round: probe and/or evaluate. `due`: when its evaluation was due (None:
        only its probe is)."""
        model = info.model
        try:
            async with self._slots:
                start = time.monotonic()
                self._waiting.pop(model, None)
                if due is not None:
                    lag = max(0.0, start - due)
                    EVALUATION_LAG.observe(lag)
                    self.lags.append(lag)
                    # Started: not overdue while its plan (and so its next due time) is read.
                    self._next_due[model] = math.inf
                await self._probe_and_evaluate(info, start, due, probe_due)
        finally:
            # A round cancelled because its lease ended is no longer the model's round.
            if self._rounds.get(model) is asyncio.current_task():
                self._waiting.pop(model, None)
                self._rounds.pop(model, None)
                if self._next_due.get(model) == math.inf:
                    self._next_due[model] = time.monotonic()  # no plan read: try next tick

    async def _probe_and_evaluate(
        self, info: ModelInfo, start: float, due: float | None, probe_due: bool
    ) -> None:
        model = info.model
        try:
            planned = await self.plan_for(model, info.task)
        except grpc.RpcError as exc:
            log.warning("no plan for %s: store unavailable (%s)", model, exc.code().name)
            return
        except Exception:
            log.exception("reading the plan of %s failed", model)
            return
        plan = planned[0]
        evaluation_due = due is not None
        if probe_due:
            self._next_probe[model] = start + plan.probes.every_seconds
            try:
                evaluation_due |= await self.probe(model, plan)
            except Exception:
                log.exception("probing %s failed", model)
        taken_at = self._taken_over.pop(model, None) if due is not None else None
        if evaluation_due and taken_at is not None:
            # Taken from another monitor: its last evaluation counts, the schedule carries on.
            wait = (taken_at - datetime.now(UTC)).total_seconds() + plan.every_seconds
            if wait > 0:
                self._next_due[model] = start + wait
                evaluation_due = False
        if not evaluation_due or not self.holds(model):
            return
        # From the start, not the due time: models due together (at start-up) spread out at
        # the pace they can be evaluated instead of staying a burst, and a round that overran
        # does not pile up the next.
        self._next_due[model] = start + plan.every_seconds
        try:
            await self.evaluate_model(model, info=info, plan=planned, fenced=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.exception("evaluating %s failed; next try in %ds", model, plan.every_seconds)
                return
            # The store says the lease ended before the record: another monitor has it now.
            log.info("%s: lease ended before its evaluation was recorded; not recorded", model)
            self._leases.pop(model, None)
            LEASED.set(len(self._leases))
        except Exception:
            log.exception("evaluating %s failed; next try in %ds", model, plan.every_seconds)

    async def _schedule(self) -> None:
        """List the models and renew their leases every tick; start the round of each leased
        model when it is due, not at the next tick."""
        models: dict[str, ModelInfo] = {}
        listed_at = followed_at = -math.inf
        while True:
            try:
                if time.monotonic() - listed_at >= self.tick_seconds:
                    listed_at = time.monotonic()
                    listed = await self._monitored_models()
                    models = await self.lease(listed)
                    if len(models) < len(listed) and listed_at - followed_at >= PEER_STATUS_SECONDS:
                        followed_at = listed_at
                        await self.follow_peers(listed)
            except grpc.RpcError as exc:
                log.warning("store unavailable for scheduling (%s)", exc.code().name)
            except Exception:
                log.exception("monitor schedule failed")
            try:
                # Leases end by the clock even while the store cannot be reached.
                self._end_expired_leases()
                models = {m: info for m, info in models.items() if m in self._leases}
                self._start_due(models)  # rounds run on their own: the loop never waits
            except Exception:
                log.exception("monitor schedule failed")
            wake = min(
                listed_at + self.tick_seconds,
                self._earliest_due(models),
                min(self._leases.values(), default=math.inf),  # a lease ends: stop at once
            )
            await asyncio.sleep(max(0.005, wake - time.monotonic()))

    # -- known-answer probes -------------------------------------------------------------------

    async def probe(self, model: str, plan: Plan) -> bool:
        """One probe round of `model`; True when its verdict differs from the last round's.

        No round without an address (the plan's, else the monitor's) or without recorded
        answers for the serving version.
        """
        address = plan.probes.address or self.probe_address
        if not address:
            return False
        serving = await self._answers_of(model, "")
        if serving is None:
            return False
        channel = self._probe_channels.get(address)
        if channel is None:
            channel = self._probe_channels[address] = aio_channel(address)
        answer = await probes.ask(channel, model, serving, timeout=self.request_timeout)
        if isinstance(answer, probes.NoAnswer) and answer.transient and self.probe_retry_seconds:
            await asyncio.sleep(self.probe_retry_seconds)
            answer = await probes.ask(channel, model, serving, timeout=self.request_timeout)
        if isinstance(answer, probes.NoAnswer):
            if not self._no_answer_counts(model):
                log.info("%s probes: no answer yet from %s (%s)", model, address, answer.reason)
                # Starting: look again soon rather than a whole `probes.every` later.
                again = time.monotonic() + min(plan.probes.every_seconds, STARTING_PROBE_SECONDS)
                self._next_probe[model] = min(self._next_probe.get(model, again), again)
                return False
            outcome = probes.ProbeRound(
                address, error=f"probes: no answer from {address}: {answer.reason}"
            )
        else:
            self._probe_answered.add(model)
            self._unanswered_since.pop(model, None)
            expected = serving
            if answer.version and answer.version != serving.version:
                # During a rollout the endpoint may answer with another version. Its recorded
                # answers are for its own rows, not the ones sent: ask again with those, and
                # judge only an answer from that version (else this round has no verdict).
                other = await self._answers_of(model, answer.version)
                if other is None:
                    return False
                answer = await probes.ask(channel, model, other, timeout=self.request_timeout)
                if isinstance(answer, probes.NoAnswer) or answer.version != other.version:
                    return False
                expected = other
            wrong = probes.wrong_answers(expected, answer, plan.probes.tolerance)
            outcome = probes.ProbeRound(address, answer.version, wrong)
        record = self.probe_records.setdefault(model, probes.ProbeRecord())
        changed = record.add(outcome)
        if changed:
            log.warning(
                "%s probes: %s", model, "; ".join(outcome.wrong) or outcome.error or "answers match"
            )
        return changed

    def _no_answer_counts(self, model: str) -> bool:
        """True once `model` answered before, or has gone unanswered past the grace."""
        if model in self._probe_answered:
            return True
        first = self._unanswered_since.setdefault(model, time.monotonic())
        return time.monotonic() - first >= self.probe_grace_seconds

    async def _answers_of(self, model: str, version: str) -> probes.KnownAnswers | None:
        """Recorded answers of `version` ("" the serving one); versions are immutable, so
        answers are cached by version, the serving version is looked up every round."""
        if version and (model, version) in self._known_answers:
            return self._known_answers[(model, version)]
        try:
            response = await self.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=model, version=version),
                timeout=self.request_timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        mv = response.model_version
        if (model, mv.version) not in self._known_answers:
            self._known_answers[(model, mv.version)] = probes.known_answers_from_schema(
                mv.version, mv.schema_json
            )
        return self._known_answers[(model, mv.version)]

    def _probe_summary(self, model: str) -> ProbeSummary | None:
        record = self.probe_records.get(model)
        if record is None or record.last is None:
            return None
        return ProbeSummary(record.rounds, record.answered, record.last.wrong, record.last.error)
