"""Protobuf ⇄ store records, and validation of what callers send."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from cyclone.errors import InvalidArgument
from cyclone.store.v1 import store_service_pb2 as pb
from services.store.db import ColumnChunk, ModelStats, ModelVersion, PredictionRow, TrainingChunk

STATUS_TO_PB = {
    "staged": pb.MODEL_STATUS_STAGED,
    "canary": pb.MODEL_STATUS_CANARY,
    "serving": pb.MODEL_STATUS_SERVING,
    "retired": pb.MODEL_STATUS_RETIRED,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}


def parse_uuid7(value: str, field: str) -> uuid.UUID:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field}: {value!r} is not a UUID") from None
    if parsed.version != 7:
        raise InvalidArgument(f"{field}: {value!r} is not a time-ordered UUIDv7 prediction id")
    return parsed


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


def from_ts(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    result: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return result


def _json_or_none(text: str, field: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a JSON object")
    return value


def model_version_from_pb(m: pb.ModelVersion) -> ModelVersion:
    if not m.model:
        raise InvalidArgument("model_version.model: empty")
    if not m.version:
        raise InvalidArgument("model_version.version: empty")
    if m.task and m.task not in ("regression", "classification"):
        raise InvalidArgument(
            f"model_version.task: expected regression or classification, got {m.task!r}"
        )
    status = PB_TO_STATUS.get(m.status, "staged") if m.status else "staged"
    if status == "serving":
        raise InvalidArgument(
            "model_version.status: register as staged or canary, then SetModelStatus"
        )
    return ModelVersion(
        model=m.model,
        version=m.version,
        artifact_uri=m.artifact_uri or None,
        sha256=m.sha256 or None,
        schema=_json_or_none(m.schema_json, "model_version.schema_json"),
        task=m.task or None,
        parent_version=m.parent_version or None,
        training_window_start=from_ts(m, "training_window_start"),
        training_window_end=from_ts(m, "training_window_end"),
        triggering_alert_id=m.triggering_alert_id or None,
        evaluation=_json_or_none(m.evaluation_json, "model_version.evaluation_json"),
        reference_profile=_json_or_none(
            m.reference_profile_json, "model_version.reference_profile_json"
        ),
        status=status,  # type: ignore[arg-type]
        training_rows=m.training_rows or None,
        family=m.family or None,
        hyperparameters=_json_or_none(m.hyperparameters_json, "model_version.hyperparameters_json"),
        holdout_metrics=_json_or_none(m.holdout_metrics_json, "model_version.holdout_metrics_json"),
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
        training_window_start=ts(m.training_window_start),
        training_window_end=ts(m.training_window_end),
        triggering_alert_id=m.triggering_alert_id or 0,
        evaluation_json=json.dumps(m.evaluation) if m.evaluation is not None else "",
        reference_profile_json=json.dumps(m.reference_profile)
        if m.reference_profile is not None
        else "",
        status=STATUS_TO_PB[m.status],
        created_at=ts(m.created_at),
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
        last_prediction_at=ts(s.last_prediction_at),
        ingest_lag_seconds=s.ingest_lag_seconds or 0.0,
    )


def prediction_to_pb(row: PredictionRow) -> pb.StoredPrediction:
    return pb.StoredPrediction(
        prediction_id=str(row.prediction_id),
        created_at=ts(row.created_at),
        model=row.model,
        version=row.version,
        input_json=json.dumps(row.input),
        output_json=json.dumps(row.output),
        label_json="" if row.label is None else json.dumps(row.label),
        latency_ms=row.latency_ms or 0.0,
    )


def label_json(label: pb.Label, index: int, task: str, classes: Sequence[str]) -> str:
    """The label as JSON, checked against the model's task."""
    field = f"labels[{index}]"
    kind = label.WhichOneof("value")
    if kind is None:
        raise InvalidArgument(f"{field}: no value (set number or text)")
    if task == "regression":
        if kind != "number":
            raise InvalidArgument(f"{field}.text: a regression model takes numeric labels")
        if not math.isfinite(label.number):
            raise InvalidArgument(f"{field}.number: {label.number} is not a finite number")
        return json.dumps(label.number)
    if kind == "number":
        # Classes from integer targets are "0", "1", ...: accept 1 and 1.0 for "1".
        number = label.number
        text = str(int(number)) if math.isfinite(number) and number.is_integer() else repr(number)
    else:
        text = label.text
    if classes and text not in classes:
        raise InvalidArgument(
            f"{field}: {text!r} is not a class of this model ({', '.join(classes)})"
        )
    return json.dumps(text)


def _column(values: list[Any], kind: str | None) -> pb.Column:
    numeric = (
        kind == "numeric"
        if kind
        else all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
        )
    )
    if numeric:
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
