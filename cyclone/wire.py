"""Small helpers every service needs at its protobuf edge: timestamps, header names and the
training-job record.

The one place these are spelled, so the SDK, the Envoy config, the services and the probes
agree on them without importing one another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from cyclone.store.v1 import store_service_pb2 as store_pb

# Envoy routes gRPC by this header (the model is also in the message; Envoy does not parse it).
MODEL_HEADER = "cyclone-model"
# A monitor probe's request: answered like any other, never logged as a prediction.
PROBE_HEADER = "cyclone-probe"
# Request headers a pooled revision's proxy cluster sets: the model version its processes,
# shared by many versions, answer (`cyclone.envoy.config`, `services/inference/pool.py`).
POOL_MODEL_HEADER = "cyclone-pool-model"
POOL_VERSION_HEADER = "cyclone-pool-version"


def ts(value: datetime) -> Timestamp:
    """An aware (or UTC-naive) datetime as a protobuf Timestamp."""
    out = Timestamp()
    out.FromDatetime(value.astimezone(UTC) if value.tzinfo is not None else value)
    return out


def ts_or_none(value: datetime | None) -> Timestamp | None:
    """`ts`, passing None through (proto3 message fields accept None as "unset")."""
    return None if value is None else ts(value)


def from_ts(message: Any, field: str) -> datetime | None:
    """`message.field` as an aware UTC datetime, None when unset."""
    if not message.HasField(field):
        return None
    result: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return result


# A training job's states (the store refuses others); a finished job is in one of TERMINAL_JOB_STATES.
JOB_STATES: Final = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "not_enough_data",
    "rejected",
)
ACTIVE_JOB_STATES: Final = ("queued", "running")
TERMINAL_JOB_STATES: Final = frozenset(JOB_STATES) - frozenset(ACTIVE_JOB_STATES)
# A queued job's stage once a trainer dispatched it to run elsewhere (a Nomad batch job): the
# remote run may be under way, so a trainer taking the job over fails it instead of running it.
DISPATCHED_STAGE: Final = "dispatched"


@dataclass(slots=True)
class TrainingJob:
    """A retraining job as the store keeps it (the field names are its `training_jobs` columns)
    and the store API's `TrainingJob` message carries it; None where the message says 0 or "".

    The store writes it (`job_to_pb`); the trainer and the monitor read it (`job_from_pb`)."""

    id: int
    model: str
    state: str
    alert_id: int | None
    reason: str
    stage: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    message: str
    new_version: str | None
    window_start: datetime | None
    window_end: datetime | None
    window_rows: int | None
    train_rows: int | None
    holdout_rows: int | None
    champion_metrics: dict[str, float] | None
    challenger_metrics: dict[str, float] | None
    decision: str
    rollout_id: str | None
    champion_version: str | None
    family: str | None
    owner: str
    # Until when `owner` holds the job without renewing it (several trainers, one store).
    lease_expires_at: datetime | None


def job_to_pb(job: TrainingJob) -> store_pb.TrainingJob:
    return store_pb.TrainingJob(
        id=job.id,
        model=job.model,
        state=job.state,
        alert_id=job.alert_id or 0,
        reason=job.reason,
        stage=job.stage,
        created_at=ts_or_none(job.created_at),
        started_at=ts_or_none(job.started_at),
        finished_at=ts_or_none(job.finished_at),
        updated_at=ts_or_none(job.updated_at),
        message=job.message,
        new_version=job.new_version or "",
        window_start=ts_or_none(job.window_start),
        window_end=ts_or_none(job.window_end),
        window_rows=job.window_rows or 0,
        train_rows=job.train_rows or 0,
        holdout_rows=job.holdout_rows or 0,
        champion_metrics_json=json.dumps(job.champion_metrics) if job.champion_metrics else "",
        challenger_metrics_json=json.dumps(job.challenger_metrics)
        if job.challenger_metrics
        else "",
        decision=job.decision,
        rollout_id=job.rollout_id or "",
        champion_version=job.champion_version or "",
        family=job.family or "",
        owner=job.owner,
        lease_expires_at=ts_or_none(job.lease_expires_at),
    )


def job_from_pb(message: store_pb.TrainingJob) -> TrainingJob:
    """The record the store sent (its metrics JSON is the store's own, already checked)."""
    return TrainingJob(
        id=message.id,
        model=message.model,
        state=message.state,
        alert_id=message.alert_id or None,
        reason=message.reason,
        stage=message.stage,
        created_at=from_ts(message, "created_at"),
        started_at=from_ts(message, "started_at"),
        finished_at=from_ts(message, "finished_at"),
        updated_at=from_ts(message, "updated_at"),
        message=message.message,
        new_version=message.new_version or None,
        window_start=from_ts(message, "window_start"),
        window_end=from_ts(message, "window_end"),
        window_rows=message.window_rows or None,
        train_rows=message.train_rows or None,
        holdout_rows=message.holdout_rows or None,
        champion_metrics=_metrics(message.champion_metrics_json),
        challenger_metrics=_metrics(message.challenger_metrics_json),
        decision=message.decision,
        rollout_id=message.rollout_id or None,
        champion_version=message.champion_version or None,
        family=message.family or None,
        owner=message.owner,
        lease_expires_at=from_ts(message, "lease_expires_at"),
    )


def _metrics(text: str) -> dict[str, float] | None:
    return {str(k): float(v) for k, v in json.loads(text).items()} if text else None
