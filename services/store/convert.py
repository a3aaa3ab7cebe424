"""Protobuf ⇄ the store's domain records: the only place that knows both.

Parsing names the request field at fault; JSON text follows the store's one policy
(`domain.checks`: `load_json`, `load_json_object`, `load_metrics`); timestamps go through
`cyclone.wire`. What a value must be is the domain's to check, not this module's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from cyclone.errors import InvalidArgument
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.wire import from_ts, ts_or_none
from services.store.db import (
    Alert,
    AlertTarget,
    ColumnChunk,
    Health,
    MetricPoint,
    MinuteStats,
    ModelStats,
    ModelStatus,
    ModelVersion,
    Plan,
    PredictionRow,
    TrainingChunk,
)
from services.store.db.role_leases import RoleFence
from services.store.db.rollouts import RolloutEventRow, RolloutRow
from services.store.domain import (
    EvaluationRecord,
    JobUpdate,
    LabelValue,
    PredictionQuery,
    RolloutUpdate,
    TrainingRequest,
    TrainingStream,
)
from services.store.domain.checks import load_json, load_json_object, load_metrics
from services.store.domain.training import JOB_COUNTS

STATUS_TO_PB = {
    "staged": pb.MODEL_STATUS_STAGED,
    "canary": pb.MODEL_STATUS_CANARY,
    "serving": pb.MODEL_STATUS_SERVING,
    "retired": pb.MODEL_STATUS_RETIRED,
}
PB_TO_STATUS: dict[int, ModelStatus] = {v: k for k, v in STATUS_TO_PB.items()}  # type: ignore[misc]


def status_filter_from_pb(value: int) -> ModelStatus | None:
    """A listing's status filter: None (every status) when unset."""
    if not value:
        return None
    status = PB_TO_STATUS.get(value)
    if status is None:
        raise InvalidArgument(
            f"status: unknown value {value}; leave it unset for every status"
            " or set one of STAGED, CANARY, SERVING, RETIRED"
        )
    return status


_LABEL_FILTER = {pb.LABEL_FILTER_LABELLED: True, pb.LABEL_FILTER_UNLABELLED: False}


# --- registry ------------------------------------------------------------------------------


def model_version_from_pb(m: pb.ModelVersion) -> ModelVersion:
    return ModelVersion(
        model=m.model,
        version=m.version,
        artifact_uri=m.artifact_uri or None,
        sha256=m.sha256 or None,
        schema=load_json_object(m.schema_json, "model_version.schema_json"),
        task=m.task or None,
        parent_version=m.parent_version or None,
        training_window_start=from_ts(m, "training_window_start"),
        training_window_end=from_ts(m, "training_window_end"),
        triggering_alert_id=m.triggering_alert_id or None,
        evaluation=load_json_object(m.evaluation_json, "model_version.evaluation_json"),
        reference_profile=load_json_object(
            m.reference_profile_json, "model_version.reference_profile_json"
        ),
        status=PB_TO_STATUS.get(m.status, "staged"),
        training_rows=m.training_rows or None,
        family=m.family or None,
        hyperparameters=load_json_object(
            m.hyperparameters_json, "model_version.hyperparameters_json"
        ),
        holdout_metrics=load_json_object(
            m.holdout_metrics_json, "model_version.holdout_metrics_json"
        ),
    )


def model_version_to_pb(m: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        model=m.model,
        version=m.version,
        artifact_uri=m.artifact_uri or "",
        sha256=m.sha256 or "",
        schema_json=json.dumps(m.schema) if m.schema is not None else "",
        task=m.task or "",
        parent_version=m.parent_version or "",
        training_window_start=ts_or_none(m.training_window_start),
        training_window_end=ts_or_none(m.training_window_end),
        triggering_alert_id=m.triggering_alert_id or 0,
        evaluation_json=json.dumps(m.evaluation) if m.evaluation is not None else "",
        reference_profile_json=json.dumps(m.reference_profile)
        if m.reference_profile is not None
        else "",
        status=STATUS_TO_PB[m.status],
        created_at=ts_or_none(m.created_at),
        training_rows=m.training_rows or 0,
        family=m.family or "",
        hyperparameters_json=json.dumps(m.hyperparameters) if m.hyperparameters is not None else "",
        holdout_metrics_json=json.dumps(m.holdout_metrics) if m.holdout_metrics is not None else "",
    )


def stats_to_pb(s: ModelStats) -> pb.ModelStats:
    return pb.ModelStats(
        model=s.model,
        predictions=s.predictions,
        labels=s.labels,
        label_coverage=s.label_coverage,
        last_prediction_at=ts_or_none(s.last_prediction_at),
        ingest_lag_seconds=s.ingest_lag_seconds or 0.0,
    )


# --- predictions and labels ------------------------------------------------------------------


def labels_from_pb(labels: Sequence[pb.Label]) -> list[tuple[str, LabelValue]]:
    out: list[tuple[str, LabelValue]] = []
    for label in labels:
        kind = label.WhichOneof("value")
        value: LabelValue = None if kind is None else getattr(label, kind)
        out.append((label.prediction_id, value))
    return out


def prediction_query_from_pb(r: pb.QueryPredictionsRequest) -> PredictionQuery:
    feature_filter = None
    if r.HasField("feature_filter"):
        f = r.feature_filter
        kind = f.WhichOneof("value")
        feature_filter = (f.name, f.op, None if kind is None else getattr(f, kind))
    return PredictionQuery(
        model=r.model,
        version=r.version,
        start=from_ts(r, "start"),
        end=from_ts(r, "end"),
        labelled=_LABEL_FILTER.get(r.label_filter),
        wrong_only=r.wrong_only,
        feature_filter=feature_filter,
        page_size=r.page_size,
        page_token=r.page_token,
        tolerance=r.tolerance,
    )


def prediction_to_pb(row: PredictionRow) -> pb.StoredPrediction:
    return pb.StoredPrediction(
        prediction_id=str(row.prediction_id),
        created_at=ts_or_none(row.created_at),
        model=row.model,
        version=row.version,
        input_json=json.dumps(row.input),
        output_json=json.dumps(row.output),
        label_json="" if row.label is None else json.dumps(row.label),
        latency_ms=row.latency_ms or 0.0,
    )


def training_request_from_pb(r: pb.GetTrainingDataRequest) -> TrainingRequest:
    return TrainingRequest(
        model=r.model,
        start=from_ts(r, "start"),
        end=from_ts(r, "end"),
        last_n=r.last_n,
        version=r.version,
        chunk_rows=r.chunk_rows,
        include_unlabelled=r.include_unlabelled,
    )


def training_chunk_to_pb(
    chunk: ColumnChunk | TrainingChunk, stream: TrainingStream
) -> pb.GetTrainingDataResponse:
    if isinstance(chunk, ColumnChunk):
        assert stream.task is not None  # typed columns need a known task
        return column_chunk_to_pb(chunk, stream.kinds, stream.task, stream.classes)
    return chunk_to_pb(chunk, stream.kinds, stream.task, stream.classes)


# --- monitoring ------------------------------------------------------------------------------


def plan_to_pb(plan: Plan) -> pb.GetPlanResponse:
    return pb.GetPlanResponse(
        model=plan.model,
        revision=plan.revision,
        plan_yaml=plan.plan_yaml,
        created_at=ts_or_none(plan.created_at),
    )


def evaluation_from_pb(r: pb.RecordEvaluationRequest, now: datetime) -> EvaluationRecord:
    points = [
        MetricPoint(
            created_at=from_ts(p, "created_at") or now,
            model=r.model,
            version=r.version,
            metric=p.metric,
            value=p.value if p.HasField("value") else None,
            level=r.level,
            details=load_json(p.details_json, f"points[{i}].details_json"),
        )
        for i, p in enumerate(r.points)
    ]
    alerts = [
        Alert(
            model=r.model,
            version=r.version,
            level=r.level,
            previous_level=a.previous_level or None,
            reasons=load_json(a.reasons_json, f"alerts[{i}].reasons_json", []),
            targets=[target_from_pb(t) for t in a.targets],
            traceparent=a.traceparent,
        )
        for i, a in enumerate(r.alerts)
    ]
    return EvaluationRecord(
        model=r.model,
        version=r.version,
        level=r.level,
        reasons=load_json(r.reasons_json, "reasons_json", []),
        summary=load_json_object(r.summary_json, "summary_json") or {},
        points=points,
        alerts=alerts,
        lease_holder=r.lease_holder,
    )


def health_to_pb(h: Health) -> pb.ModelHealth:
    return pb.ModelHealth(
        model=h.model,
        version=h.version,
        level=h.level,
        reasons_json=json.dumps(h.reasons),
        summary_json=json.dumps(h.summary),
        evaluated_at=ts_or_none(h.evaluated_at),
        changed_at=ts_or_none(h.changed_at),
    )


def point_to_pb(p: MetricPoint) -> pb.MetricPoint:
    return pb.MetricPoint(
        created_at=ts_or_none(p.created_at),
        model=p.model,
        version=p.version or "",
        metric=p.metric,
        value=p.value,
        level=p.level or "",
        details_json=json.dumps(p.details) if p.details is not None else "",
    )


def minute_stats_to_pb(m: MinuteStats) -> pb.PredictionStats:
    return pb.PredictionStats(
        version=m.version,
        bucket=ts_or_none(m.bucket),
        predictions=m.predictions,
        avg_latency_ms=m.avg_latency_ms,
        p50_latency_ms=m.p50_latency_ms,
        max_latency_ms=m.max_latency_ms,
    )


def target_from_pb(t: pb.AlertTarget) -> AlertTarget:
    return AlertTarget(t.action, t.sink, _plain(json_format.MessageToDict(t.config)))


def target_to_pb(t: AlertTarget) -> pb.AlertTarget:
    out = pb.AlertTarget(action=t.action, sink=t.sink)
    out.config.update(t.config)
    return out


def _plain(value: Any) -> Any:
    """A Struct's numbers are all doubles: give whole ones back as ints (3, not 3.0)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def alert_to_pb(a: Alert) -> pb.AlertRecord:
    return pb.AlertRecord(
        id=a.id or 0,
        created_at=ts_or_none(a.created_at),
        model=a.model,
        version=a.version or "",
        level=a.level,
        previous_level=a.previous_level or "",
        reasons_json=json.dumps(a.reasons),
        targets=[target_to_pb(t) for t in a.targets],
        status=a.status,
        attempts=a.attempts,
        last_error=a.last_error or "",
        traceparent=a.traceparent,
    )


# --- training jobs ---------------------------------------------------------------------------

# UpdateTrainingJob's optional fields by kind; each is the job column of the same name.
_JOB_TEXT = ("state", "stage", "message", "decision", "rollout_id", "champion_version", "family")
_JOB_TIMES = ("started_at", "finished_at", "window_start", "window_end")
_JOB_METRICS = ("champion_metrics", "challenger_metrics")


def job_update_from_pb(r: pb.UpdateTrainingJobRequest) -> JobUpdate:
    """The fields the caller set: proto3 `optional` presence says which."""
    message: Message = r  # the names come from the tuples above: look them up untyped
    changes: dict[str, Any] = {}
    for name in (*_JOB_TEXT, *JOB_COUNTS):
        if message.HasField(name):
            changes[name] = getattr(r, name)
    for name in _JOB_TIMES:
        when = from_ts(r, name)
        if when is not None:
            changes[name] = when
    for name in _JOB_METRICS:
        field = f"{name}_json"
        if message.HasField(field):
            changes[name] = load_metrics(getattr(r, field), field)
    return JobUpdate(r.job_id, changes, r.expected_state, r.expected_owner)


def trained_version_from_pb(r: pb.RegisterTrainedVersionRequest) -> ModelVersion | None:
    return model_version_from_pb(r.model_version) if r.HasField("model_version") else None


# --- rollouts --------------------------------------------------------------------------------


def rollout_from_pb(r: pb.RolloutRecord) -> RolloutRow:
    """A rollout to create (its id, times and events are the store's to set)."""
    return RolloutRow(
        model=r.model,
        to_version=r.to_version,
        strategy=r.strategy,
        state=r.state,
        from_version=r.from_version or None,
        current_weight=r.current_weight,
        weights=load_json_object(r.weights_json, "rollout.weights_json") or {},
        reason=r.reason,
        spec=load_json_object(r.spec_json, "rollout.spec_json") or {},
        progress=load_json_object(r.progress_json, "rollout.progress_json") or {},
    )


def first_event_from_pb(r: pb.CreateRolloutRequest) -> RolloutEventRow | None:
    return event_from_pb(r.event) if r.HasField("event") else None


def event_from_pb(e: pb.RolloutEvent) -> RolloutEventRow:
    return RolloutEventRow(
        state=e.state,
        weight=e.weight,
        decision=e.decision,
        reason=e.reason,
        numbers=dict(e.numbers),
        created_at=from_ts(e, "time"),
    )


def rollout_update_from_pb(r: pb.UpdateRolloutRequest) -> RolloutUpdate:
    return RolloutUpdate(
        rollout_id=r.rollout_id,
        state=r.state,
        current_weight=r.current_weight,
        weights=load_json_object(r.weights_json, "weights_json"),
        reason=r.reason or None,
        progress=load_json_object(r.progress_json, "progress_json"),
        events=[event_from_pb(e) for e in r.events],
        fence=fence_from_pb(r),
    )


def fence_from_pb(r: pb.CreateRolloutRequest | pb.UpdateRolloutRequest) -> RoleFence | None:
    """The role lease a write is made under; None when the request names none."""
    if not r.HasField("fence"):
        return None
    return RoleFence(r.fence.role, r.fence.holder, r.fence.epoch)


def rollout_to_pb(r: RolloutRow) -> pb.RolloutRecord:
    return pb.RolloutRecord(
        id=r.id,
        model=r.model,
        from_version=r.from_version or "",
        to_version=r.to_version,
        strategy=r.strategy,
        state=r.state,
        current_weight=r.current_weight,
        weights_json=json.dumps(r.weights),
        reason=r.reason,
        spec_json=json.dumps(r.spec),
        progress_json=json.dumps(r.progress),
        events=[
            pb.RolloutEvent(
                seq=e.seq,
                time=ts_or_none(e.created_at),
                state=e.state,
                weight=e.weight,
                decision=e.decision,
                reason=e.reason,
                numbers=e.numbers,
            )
            for e in r.events
        ],
        created_at=ts_or_none(r.created_at),
        updated_at=ts_or_none(r.updated_at),
    )


# --- training data: columnar chunks ------------------------------------------------------------


def _column(values: list[Any], kind: str | None) -> pb.Column:
    numeric = (
        kind == "numeric"
        if kind
        else all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
        )
    )
    if numeric:
        import numpy as np  # lazy: numpy is ~0.2 s of the store's start and only chunks use it

        array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        return pb.Column(numbers=array.tolist())
    return pb.Column(strings=["" if v is None else str(v) for v in values])


def _numbers(values: Sequence[float | None]) -> Sequence[float]:
    if None in values:  # a C-speed scan; missing values become NaN only when there are any
        return [math.nan if v is None else v for v in values]
    return values  # type: ignore[return-value]


def _strings(values: Sequence[str | None]) -> Sequence[str]:
    return ["" if v is None else v for v in values] if None in values else values  # type: ignore[return-value]


def column_chunk_to_pb(
    chunk: ColumnChunk, kinds: dict[str, str], task: str, class_labels: Sequence[str]
) -> pb.GetTrainingDataResponse:
    response = pb.GetTrainingDataResponse(
        prediction_ids=chunk.prediction_ids,
        created_at_micros=chunk.created_at_micros,
        labelled=chunk.labelled,
        latency_ms=_numbers(chunk.latency_ms),
    )
    for name, values in chunk.features.items():
        column = response.features[name]
        if kinds.get(name) == "categorical":
            column.strings.extend(_strings(values))
        else:
            column.numbers.extend(_numbers(values))
    if task == "classification":
        response.predictions.strings.extend(_strings(chunk.predictions))
        response.labels.strings.extend(_strings(chunk.labels))
        if class_labels and chunk.probabilities:
            response.class_labels.extend(class_labels)
            # rows x classes, row-major; None (missing) becomes NaN.
            import numpy as np  # lazy, see _column

            response.probabilities.extend(
                np.array(chunk.probabilities, dtype=np.float64).T.ravel().tolist()
            )
    else:
        response.predictions.numbers.extend(_numbers(chunk.predictions))
        response.labels.numbers.extend(_numbers(chunk.labels))
    return response


def chunk_to_pb(
    chunk: TrainingChunk, kinds: dict[str, str], task: str | None, class_labels: Sequence[str] = ()
) -> pb.GetTrainingDataResponse:
    inputs = chunk.inputs()
    outputs = chunk.outputs()
    labels = chunk.labels()
    names: list[str] = list(kinds) or list(dict.fromkeys(k for row in inputs[:100] for k in row))
    response = pb.GetTrainingDataResponse(
        prediction_ids=[str(i) for i in chunk.prediction_ids],
        created_at_micros=[int(t.timestamp() * 1_000_000) for t in chunk.created_at],
        labelled=[v is not None for v in labels],
    )
    for name in names:
        response.features[name].CopyFrom(
            _column([row.get(name) for row in inputs], kinds.get(name))
        )
    if task == "classification" or (task is None and outputs and "label" in outputs[0]):
        response.predictions.strings.extend(str(o.get("label", "")) for o in outputs)
        response.labels.strings.extend("" if v is None else str(v) for v in labels)
        if class_labels:
            response.class_labels.extend(class_labels)
            nan = math.nan
            response.probabilities.extend(
                p.get(c, nan)
                for o in outputs
                for p in (o.get("probabilities") or {},)
                for c in class_labels
            )
    else:
        response.predictions.numbers.extend(float(o.get("value", math.nan)) for o in outputs)
        response.labels.numbers.extend(math.nan if v is None else float(v) for v in labels)
    return response
