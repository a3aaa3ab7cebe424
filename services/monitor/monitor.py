"""The monitor's engine: plans on their schedule, windows from the store, levels, alerts.

Everything persistent lives in the store (plans, metric history, current level, the
alert outbox), reached only through its gRPC API; this process keeps the latest
evaluation per model in memory for GetStatus and WatchStatus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from prometheus_client import Gauge

from cyclone.errors import InvalidArgument, NotFound
from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.plan import Plan, PlanError, Registry, default_plan, parse_plan, plan_to_yaml
from cyclone.plugin_api import Level, ReferenceProfile
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor.evaluate import Evaluation, evaluate
from services.monitor.window import window_from_chunks

log = logging.getLogger(__name__)

LEVEL_TO_PB = {Level.GREEN: pb.LEVEL_GREEN, Level.AMBER: pb.LEVEL_AMBER, Level.RED: pb.LEVEL_RED}
NAME_TO_PB = {"GREEN": pb.LEVEL_GREEN, "AMBER": pb.LEVEL_AMBER, "RED": pb.LEVEL_RED}

HEALTH = Gauge(
    "cyclone_model_health_level", "RAG level: 0 green, 1 amber, 2 red", ["model", "version"]
)
METRIC = Gauge(
    "cyclone_model_metric", "Latest monitored metric value", ["model", "version", "metric"]
)
DRIFTED = Gauge(
    "cyclone_model_drifted_features", "Features flagged by any drift test", ["model", "version"]
)


def _ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def status_from_evaluation(
    model: str, version: str, ev: Evaluation, revision: int, at: datetime
) -> pb.ModelStatus:
    status = pb.ModelStatus(
        model=model,
        version=version,
        level=LEVEL_TO_PB[ev.level],
        reasons=list(ev.reasons),
        actions=list(ev.actions),
        rows=ev.n_rows,
        labelled_rows=ev.n_labelled,
        evaluated_at=_ts(at),
        plan_revision=revision,
        notes=list(ev.notes),
    )
    for name, result in ev.metrics.items():
        status.metrics.add(
            name=name, value=result.value, status=result.status, detail=result.detail
        )
    for test, per_feature in ev.drift.items():
        for feature, d in per_feature.items():
            status.drift.add(
                test=test,
                feature=feature,
                statistic=d.statistic,
                p_value=d.p_value,
                effect_size=d.effect_size,
                drifted=d.drifted,
                threshold=d.threshold,
            )
    return status


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metric_points(status: pb.ModelStatus, at: datetime) -> list[store_pb.MetricPoint]:
    created = _ts(at)
    points = [
        store_pb.MetricPoint(
            created_at=created,
            metric=m.name,
            value=m.value if m.HasField("value") else None,
            details_json=json.dumps({"status": m.status, "detail": m.detail})
            if m.status != "ok"
            else "",
        )
        for m in status.metrics
    ]
    for d in status.drift:
        # A skipped test (too few rows) has NaN statistics: not valid JSON, so store them as null.
        points.append(
            store_pb.MetricPoint(
                created_at=created,
                metric=f"drift.{d.test}.{d.feature}",
                value=_finite(d.effect_size),
                details_json=json.dumps(
                    {
                        "statistic": _finite(d.statistic),
                        "drifted": d.drifted,
                        "threshold": _finite(d.threshold),
                    }
                ),
            )
        )
    points.append(
        store_pb.MetricPoint(created_at=created, metric="level", value=float(status.level - 1))
    )
    return points


class Monitor:
    def __init__(
        self,
        store_address: str,
        *,
        record_path: Path,
        tick_seconds: float = 1.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.store_address = store_address
        self.record_path = record_path
        self.tick_seconds = tick_seconds
        self.request_timeout = request_timeout
        self.statuses: dict[str, pb.ModelStatus] = {}
        self._subscribers: set[asyncio.Queue[pb.ModelStatus]] = set()
        self._next_due: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._channel: aio.Channel | None = None
        self._store: store_grpc.StoreServiceStub | None = None
        self._task: asyncio.Task[None] | None = None
        self.dashboard: Any = None  # set by the server builder when the dashboard is on

    @property
    def store(self) -> store_grpc.StoreServiceStub:
        assert self._store is not None, "Monitor.start() first"
        return self._store

    async def start(self, *, schedule: bool = True) -> None:
        self._channel = aio.insecure_channel(self.store_address)
        self._store = store_grpc.StoreServiceStub(self._channel)
        if schedule:
            self._task = asyncio.create_task(self._schedule(), name="monitor-schedule")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
            return parse_plan(stored.plan_yaml, Registry.from_plugins()), stored.revision
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
        await self._model_version(model)  # a plan for an unknown model is a typo, not a plan
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

    async def _model_version(self, model: str) -> store_pb.ModelVersion:
        if not model:
            raise InvalidArgument("model: empty")
        try:
            response = await self.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=model), timeout=self.request_timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model: {model!r} is not registered") from None
            raise
        version: store_pb.ModelVersion = response.model_version
        return version

    async def _window_request(
        self, mv: store_pb.ModelVersion, plan: Plan
    ) -> store_pb.GetTrainingDataRequest:
        request = store_pb.GetTrainingDataRequest(
            model=mv.model, version=mv.version, include_unlabelled=True
        )
        now = datetime.now(UTC)
        if plan.window.rows:
            request.last_n = plan.window.rows
        if plan.window.kind == "expanding":
            request.start.CopyFrom(
                mv.created_at
                if mv.HasField("created_at")
                else _ts(datetime(1970, 1, 1, tzinfo=UTC))
            )
            request.end.CopyFrom(_ts(now + timedelta(seconds=1)))
        elif plan.window.duration_seconds:
            request.start.CopyFrom(_ts(now - timedelta(seconds=plan.window.duration_seconds)))
            request.end.CopyFrom(_ts(now + timedelta(seconds=1)))
        return request

    async def evaluate_model(self, model: str) -> tuple[pb.ModelStatus, list[int]]:
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            return await self._evaluate(model)

    async def _evaluate(self, model: str) -> tuple[pb.ModelStatus, list[int]]:
        mv = await self._model_version(model)
        plan, revision = await self.plan_for(model, mv.task)
        request = await self._window_request(mv, plan)
        chunks = [
            c async for c in self.store.GetTrainingData(request, timeout=self.request_timeout)
        ]
        window = window_from_chunks(chunks, mv.task)
        reference = (
            ReferenceProfile.from_dict(json.loads(mv.reference_profile_json))
            if mv.reference_profile_json
            else None
        )
        evaluation_json = json.loads(mv.evaluation_json) if mv.evaluation_json else {}
        baseline = {
            k: float(v)
            for k, v in evaluation_json.get("metrics", {}).items()
            if isinstance(v, int | float)
        }
        # Metric plugins are numpy-bound; keep the event loop free for RPCs meanwhile.
        ev = await asyncio.to_thread(evaluate, plan, window, reference, baseline)
        at = datetime.now(UTC)
        status = status_from_evaluation(model, mv.version, ev, revision, at)
        outcome = await self.store.RecordEvaluation(
            store_pb.RecordEvaluationRequest(
                model=model,
                version=mv.version,
                level=ev.level.value,
                reasons_json=json.dumps(list(ev.reasons)),
                summary_json=json.dumps(
                    {"rows": ev.n_rows, "labelled_rows": ev.n_labelled, "actions": list(ev.actions)}
                ),
                points=metric_points(status, at),
                alerts=self._alerts_for(plan, ev),
            ),
            timeout=self.request_timeout,
        )
        if outcome.level_changed:
            log.warning(
                "%s %s: %s -> %s (%s); %d alert(s) queued",
                model,
                mv.version,
                outcome.previous_level or "-",
                ev.level.value,
                "; ".join(ev.reasons) or "no reasons",
                len(outcome.alert_ids),
            )
        self._publish(status, ev)
        return status, list(outcome.alert_ids)

    def _alerts_for(self, plan: Plan, ev: Evaluation) -> list[store_pb.AlertRecord]:
        """One outbox row per (action, sink): each is delivered and retried on its own."""
        reasons = json.dumps(list(ev.reasons))
        targets: list[dict[str, Any]] = []
        for action in ev.actions:
            if action == "notify" and plan.notify:
                targets.extend(
                    {"action": action, "sink": s.sink, "config": dict(s.config)}
                    for s in plan.notify
                )
            else:
                # Until a trainer is deployed, retrain/rollback requests are recorded durably.
                targets.append(
                    {"action": action, "sink": "record", "config": {"path": str(self.record_path)}}
                )
        return [
            store_pb.AlertRecord(reasons_json=reasons, actions_json=json.dumps([t]))
            for t in targets
        ]

    def _publish(self, status: pb.ModelStatus, ev: Evaluation) -> None:
        self.statuses[status.model] = status
        HEALTH.labels(status.model, status.version).set(status.level - 1)
        for m in status.metrics:
            if m.HasField("value"):
                METRIC.labels(status.model, status.version, m.name).set(m.value)
        DRIFTED.labels(status.model, status.version).set(len(ev.drifted.get("any", ())))
        for queue in self._subscribers:
            queue.put_nowait(status)

    async def watch(self, model: str) -> AsyncIterator[pb.ModelStatus]:
        queue: asyncio.Queue[pb.ModelStatus] = asyncio.Queue()
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

    # -- schedule ------------------------------------------------------------------------------

    async def _monitored_models(self) -> dict[str, str]:
        response = await self.store.ListModelVersions(
            store_pb.ListModelVersionsRequest(), timeout=self.request_timeout
        )
        return {
            v.model: v.task
            for v in response.model_versions
            if v.status == store_pb.MODEL_STATUS_SERVING
        }

    async def run_due(self) -> None:
        """Evaluate every serving model whose plan is due."""
        now = time.monotonic()
        for model, task in (await self._monitored_models()).items():
            if self._next_due.get(model, 0.0) > now:
                continue
            plan, _ = await self.plan_for(model, task)
            self._next_due[model] = now + plan.every_seconds
            try:
                await self.evaluate_model(model)
            except Exception:
                log.exception("evaluating %s failed; next try in %ds", model, plan.every_seconds)

    async def _schedule(self) -> None:
        while True:
            try:
                await self.run_due()
            except grpc.RpcError as exc:
                log.warning("store unavailable for scheduling (%s)", exc.code().name)
            except Exception:
                log.exception("monitor schedule failed")
            await asyncio.sleep(self.tick_seconds)
