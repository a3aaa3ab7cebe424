"""Protobuf ⇄ the monitor's domain records (`records.py`), for the store client, the servicer
and the dashboard. The only module of the monitor that knows both."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, get_args

from google.protobuf import json_format

from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.plugin_api import DriftResult, Level, MetricResult, ReferenceProfile
from cyclone.specs import Status
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.wire import from_ts, ts
from services.monitor.records import (
    AlertTarget,
    EvaluationOutcome,
    MetricPoint,
    ModelInfo,
    ModelStatus,
    QueuedAlert,
    RolloutStep,
    RolloutSummary,
    TrafficPoint,
    TrainingJobSummary,
    VersionLineage,
    WindowChunk,
)

LEVEL_TO_PB = {Level.GREEN: pb.LEVEL_GREEN, Level.AMBER: pb.LEVEL_AMBER, Level.RED: pb.LEVEL_RED}
NAME_TO_PB = {level.value: code for level, code in LEVEL_TO_PB.items()}


# --- from the store ----------------------------------------------------------------------------


def model_info_from_store(mv: store_pb.ModelVersion) -> ModelInfo:
    reference = (
        ReferenceProfile.from_dict(json.loads(mv.reference_profile_json))
        if mv.reference_profile_json
        else None
    )
    evaluation = json.loads(mv.evaluation_json) if mv.evaluation_json else {}
    baseline = {
        k: float(v) for k, v in evaluation.get("metrics", {}).items() if isinstance(v, int | float)
    }
    return ModelInfo(
        model=mv.model,
        version=mv.version,
        task=mv.task,
        created_at=from_ts(mv, "created_at"),
        reference=reference,
        baseline=baseline,
    )


def serving_versions(versions: Sequence[store_pb.ModelVersion]) -> list[store_pb.ModelVersion]:
    """The serving version of every model (unparsed: the caller parses each version once)."""
    return [v for v in versions if v.status == store_pb.MODEL_STATUS_SERVING]


def window_chunk_from_store(chunk: store_pb.GetTrainingDataResponse, task: str) -> WindowChunk:
    """No copies: the domain chunk holds the message's repeated fields."""
    features: dict[str, Sequence[Any]] = {}
    categorical: set[str] = set()
    for name, column in chunk.features.items():
        if column.strings:
            categorical.add(name)
            features[name] = column.strings
        else:
            features[name] = column.numbers
    classification = task == "classification"
    return WindowChunk(
        features=features,
        categorical=categorical,
        predictions=chunk.predictions.strings if classification else chunk.predictions.numbers,
        labels=chunk.labels.strings if classification else chunk.labels.numbers,
        labelled=chunk.labelled,
        probabilities=chunk.probabilities if classification else (),
        class_labels=chunk.class_labels if classification else (),
        latency_ms=chunk.latency_ms,
        created_at_micros=chunk.created_at_micros,
    )


def outcome_from_store(r: store_pb.RecordEvaluationResponse) -> EvaluationOutcome:
    return EvaluationOutcome(r.previous_level, r.level_changed, list(r.alert_ids))


def target_from_store(t: store_pb.AlertTarget) -> AlertTarget:
    return AlertTarget(t.action, t.sink, _plain(json_format.MessageToDict(t.config)))


def _plain(value: Any) -> Any:
    """A Struct's numbers are all doubles: give whole ones back as ints (3, not 3.0)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def alert_from_store(record: store_pb.AlertRecord) -> QueuedAlert:
    return QueuedAlert(
        id=record.id,
        model=record.model,
        version=record.version,
        level=record.level,
        previous_level=record.previous_level,
        reasons=[str(r) for r in json.loads(record.reasons_json or "[]")],
        targets=[target_from_store(t) for t in record.targets],
        created_at=from_ts(record, "created_at"),
        status=record.status,
        attempts=record.attempts,
        last_error=record.last_error,
    )


def status_from_health(health: store_pb.ModelHealth) -> ModelStatus:
    """Another monitor's latest evaluation as the store keeps it (`evaluation_summary`): level,
    reasons, actions, row counts, metric values, notes and the drift tests' flagged features."""
    from services.monitor.evaluate import Evaluation

    summary = json.loads(health.summary_json or "{}")
    if not isinstance(summary, dict):
        summary = {}
    drift = _drift_from_summary(summary.get("drift"))
    evaluation = Evaluation(
        level=Level(health.level),
        reasons=tuple(str(r) for r in json.loads(health.reasons_json or "[]")),
        actions=tuple(str(a) for a in summary.get("actions", ())),
        metrics=_metrics_from_summary(summary.get("metrics")),
        drift=drift,
        drifted=_drifted(drift),
        notes=tuple(str(n) for n in summary.get("notes", ())),
        n_rows=int(summary.get("rows", 0)),
        n_labelled=int(summary.get("labelled_rows", 0)),
    )
    evaluated_at = from_ts(health, "evaluated_at") or datetime.now(UTC)
    revision = summary.get("plan_revision", 0)
    plan_revision = revision if isinstance(revision, int) else 0
    return ModelStatus(health.model, health.version, evaluation, plan_revision, evaluated_at)


_STATUSES: tuple[Status, ...] = get_args(Status)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _metrics_from_summary(raw: Any) -> dict[str, MetricResult]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, MetricResult] = {}
    for name, entry in raw.items():
        if isinstance(entry, dict):
            status = entry.get("status")
            out[str(name)] = MetricResult(
                _finite(entry.get("value")),
                status if status in _STATUSES else "error",
                str(entry.get("detail", "")),
            )
    return out


def _drifted(drift: dict[str, dict[str, DriftResult]]) -> dict[str, tuple[str, ...]]:
    """Flagged features per test and under "any", as `evaluate` gives them."""
    if not drift:
        return {}
    flagged = {test: tuple(features) for test, features in drift.items()}
    flagged["any"] = tuple(sorted({f for features in drift.values() for f in features}))
    return flagged


def _drift_from_summary(raw: Any) -> dict[str, dict[str, DriftResult]]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, dict[str, DriftResult]] = {}
    for test, features in raw.items():
        if not isinstance(features, dict):
            continue
        results = {}
        for feature, values in features.items():
            if isinstance(values, list) and len(values) == 4:
                statistic, p_value, effect, threshold = (_finite(v) for v in values)
                results[str(feature)] = DriftResult(
                    statistic=statistic or 0.0,
                    p_value=p_value,
                    effect_size=effect or 0.0,
                    drifted=True,
                    threshold=threshold or 0.0,
                )
        if results:
            out[str(test)] = results
    return out


# --- to the store ------------------------------------------------------------------------------


def training_request(
    info: ModelInfo, start: datetime | None, end: datetime | None, last_n: int
) -> store_pb.GetTrainingDataRequest:
    request = store_pb.GetTrainingDataRequest(
        model=info.model, version=info.version, include_unlabelled=True, last_n=last_n
    )
    if start is not None:
        request.start.CopyFrom(ts(start))
    if end is not None:
        request.end.CopyFrom(ts(end))
    return request


def point_to_store(p: MetricPoint) -> store_pb.MetricPoint:
    return store_pb.MetricPoint(
        created_at=ts(p.created_at),
        metric=p.metric,
        value=p.value,
        details_json=json.dumps(p.details) if p.details is not None else "",
    )


def target_to_store(t: AlertTarget) -> store_pb.AlertTarget:
    out = store_pb.AlertTarget(action=t.action, sink=t.sink)
    out.config.update(dict(t.config))
    return out


def evaluation_to_store(
    status: ModelStatus, points: Sequence[MetricPoint], targets: Sequence[AlertTarget]
) -> store_pb.RecordEvaluationRequest:
    """One evaluation with its history points and one alert per (action, sink) target."""
    ev = status.evaluation
    reasons = json.dumps(list(ev.reasons))
    return store_pb.RecordEvaluationRequest(
        model=status.model,
        version=status.version,
        level=ev.level.value,
        reasons_json=reasons,
        summary_json=json.dumps(evaluation_summary(status)),
        points=[point_to_store(p) for p in points],
        alerts=[
            store_pb.AlertRecord(reasons_json=reasons, targets=[target_to_store(t)])
            for t in targets
        ],
    )


def evaluation_summary(status: ModelStatus) -> dict[str, Any]:
    """What the store keeps of an evaluation beside level and reasons, enough for another
    monitor to show it (`status_from_health`). Drift only for the flagged features: every
    monitor reads every model's summary every few seconds, so it stays small."""
    ev = status.evaluation
    drift = {
        test: {
            feature: [
                _finite(d.statistic),
                _finite(d.p_value),
                _finite(d.effect_size),
                _finite(d.threshold),
            ]
            for feature, d in per_feature.items()
            if d.drifted
        }
        for test, per_feature in ev.drift.items()
    }
    return {
        "rows": ev.n_rows,
        "labelled_rows": ev.n_labelled,
        "actions": list(ev.actions),
        "plan_revision": status.plan_revision,
        "notes": list(ev.notes),
        "metrics": {
            name: {"value": _finite(r.value), "status": r.status, "detail": r.detail}
            for name, r in ev.metrics.items()
        },
        "drift": {test: features for test, features in drift.items() if features},
    }


# --- to the monitor's clients ----------------------------------------------------------------


def status_to_pb(status: ModelStatus) -> pb.ModelStatus:
    ev = status.evaluation
    out = pb.ModelStatus(
        model=status.model,
        version=status.version,
        level=LEVEL_TO_PB[ev.level],
        reasons=list(ev.reasons),
        actions=list(ev.actions),
        rows=ev.n_rows,
        labelled_rows=ev.n_labelled,
        evaluated_at=ts(status.evaluated_at),
        plan_revision=status.plan_revision,
        notes=list(ev.notes),
    )
    for name, result in ev.metrics.items():
        out.metrics.add(name=name, value=result.value, status=result.status, detail=result.detail)
    for test, per_feature in ev.drift.items():
        for feature, d in per_feature.items():
            out.drift.add(
                test=test,
                feature=feature,
                statistic=d.statistic,
                p_value=d.p_value,
                effect_size=d.effect_size,
                drifted=d.drifted,
                threshold=d.threshold,
            )
    return out


def alert_to_pb(alert: QueuedAlert) -> pb.Alert:
    # The monitor queues one target per alert.
    target = alert.targets[0] if alert.targets else AlertTarget("", "")
    return pb.Alert(
        id=alert.id,
        created_at=ts(alert.created_at) if alert.created_at is not None else None,
        model=alert.model,
        version=alert.version,
        level=NAME_TO_PB.get(alert.level, pb.LEVEL_UNSPECIFIED),
        previous_level=NAME_TO_PB.get(alert.previous_level, pb.LEVEL_UNSPECIFIED),
        reasons=alert.reasons,
        action=target.action,
        sink=target.sink,
        status=alert.status,
        attempts=alert.attempts,
        last_error=alert.last_error,
    )


# --- store records the dashboard shows --------------------------------------------------------

_VERSION_STATUS = {
    store_pb.MODEL_STATUS_STAGED: "staged",
    store_pb.MODEL_STATUS_CANARY: "canary",
    store_pb.MODEL_STATUS_SERVING: "serving",
    store_pb.MODEL_STATUS_RETIRED: "retired",
}


def lineage_from_store(mv: store_pb.ModelVersion) -> VersionLineage:
    return VersionLineage(
        model=mv.model,
        version=mv.version,
        status=_VERSION_STATUS.get(mv.status, "unknown"),
        created_at=from_ts(mv, "created_at"),
        parent_version=mv.parent_version,
        family=mv.family,
        training_rows=mv.training_rows,
        triggering_alert_id=mv.triggering_alert_id,
        training_window_start=from_ts(mv, "training_window_start"),
        training_window_end=from_ts(mv, "training_window_end"),
    )


def job_from_store(job: store_pb.TrainingJob) -> TrainingJobSummary:
    return TrainingJobSummary(
        id=job.id,
        model=job.model,
        state=job.state,
        stage=job.stage,
        reason=job.reason,
        alert_id=job.alert_id,
        champion_version=job.champion_version,
        new_version=job.new_version,
        decision=job.decision,
        message=job.message,
        created_at=from_ts(job, "created_at"),
        finished_at=from_ts(job, "finished_at"),
    )


def rollout_from_store(r: store_pb.RolloutRecord) -> RolloutSummary:
    weights = json.loads(r.weights_json) if r.weights_json else {}
    return RolloutSummary(
        id=r.id,
        model=r.model,
        from_version=r.from_version,
        to_version=r.to_version,
        strategy=r.strategy,
        state=r.state,
        current_weight=r.current_weight,
        weights={str(k): float(v) for k, v in weights.items()} if isinstance(weights, dict) else {},
        reason=r.reason,
        updated_at=from_ts(r, "updated_at"),
        steps=[
            RolloutStep(e.seq, from_ts(e, "time"), e.state, e.weight, e.decision, e.reason)
            for e in r.events
        ],
    )


def point_from_store(p: store_pb.MetricPoint) -> MetricPoint:
    return MetricPoint(
        created_at=from_ts(p, "created_at") or datetime.now(UTC),
        metric=p.metric,
        value=p.value if p.HasField("value") else None,
        details=json.loads(p.details_json) if p.details_json else None,
    )


def traffic_from_store(s: store_pb.PredictionStats) -> TrafficPoint:
    return TrafficPoint(
        version=s.version,
        bucket=from_ts(s, "bucket") or datetime.now(UTC),
        predictions=s.predictions,
        avg_latency_ms=s.avg_latency_ms if s.HasField("avg_latency_ms") else None,
        p50_latency_ms=s.p50_latency_ms if s.HasField("p50_latency_ms") else None,
        max_latency_ms=s.max_latency_ms if s.HasField("max_latency_ms") else None,
    )
