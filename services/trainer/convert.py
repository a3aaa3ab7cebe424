"""Protobuf <-> the trainer's domain: jobs and rollouts."""

from __future__ import annotations

from cyclone import rollout_strategies
from cyclone.errors import InvalidArgument
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.wire import ts_or_none
from services.trainer.jobs import Job
from services.trainer.rollout import Rollout, RolloutState, RolloutStep

JOB_STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "not_enough_data": pb.JOB_STATE_NOT_ENOUGH_DATA,
    "rejected": pb.JOB_STATE_REJECTED,
}
PB_TO_JOB_STATE = {int(v): k for k, v in JOB_STATE_TO_PB.items()}

STATE_TO_PB = {
    RolloutState.PENDING: pb.ROLLOUT_STATE_PENDING,
    RolloutState.PROGRESSING: pb.ROLLOUT_STATE_PROGRESSING,
    RolloutState.PAUSED: pb.ROLLOUT_STATE_PAUSED,
    RolloutState.PROMOTED: pb.ROLLOUT_STATE_PROMOTED,
    RolloutState.ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
    RolloutState.FAILED: pb.ROLLOUT_STATE_FAILED,
}
PB_TO_STATE: dict[int, RolloutState] = {int(v): k for k, v in STATE_TO_PB.items()}


def strategy_from_pb(value: int) -> str | None:
    """None for UNSPECIFIED (the plan decides)."""
    try:
        return rollout_strategies.strategy_from_pb(value)
    except ValueError as exc:
        raise InvalidArgument(f"strategy: {exc}") from None


def _strategy_to_pb(strategy: str) -> pb.RolloutStrategy.ValueType:
    """UNSPECIFIED for a name this build no longer knows (a record from an older one)."""
    try:
        return rollout_strategies.strategy_to_pb(strategy)
    except ValueError:
        return pb.ROLLOUT_STRATEGY_UNSPECIFIED


def state_from_pb(value: int) -> RolloutState | None:
    if value == pb.ROLLOUT_STATE_UNSPECIFIED:
        return None
    if value not in PB_TO_STATE:
        raise InvalidArgument(f"state: unknown rollout state {value}")
    return PB_TO_STATE[value]


def step_to_pb(step: RolloutStep) -> pb.RolloutStep:
    return pb.RolloutStep(
        time=ts_or_none(step.time),
        weight=step.weight,
        decision=step.decision,
        numbers={k: float(v) for k, v in step.numbers.items()},
        reason=step.reason,
    )


def rollout_to_pb(r: Rollout) -> pb.Rollout:
    return pb.Rollout(
        id=r.id,
        model=r.model,
        from_version=r.from_version or "",
        to_version=r.to_version,
        strategy=_strategy_to_pb(r.spec.strategy),
        state=STATE_TO_PB[r.state],
        current_weight=r.weight,
        steps=[step_to_pb(s) for s in r.steps],
        reason=r.reason,
        created_at=ts_or_none(r.created_at),
        updated_at=ts_or_none(r.updated_at),
    )


def job_state_from_pb(value: int) -> str:
    if value not in PB_TO_JOB_STATE:
        raise InvalidArgument(f"state: unknown job state {value}")
    return PB_TO_JOB_STATE[value]


def job_to_pb(j: Job) -> pb.Job:
    return pb.Job(
        id=j.id,
        model=j.model,
        state=JOB_STATE_TO_PB.get(j.state, pb.JOB_STATE_UNSPECIFIED),
        alert_id=j.alert_id,
        reason=j.reason,
        stage=j.stage,
        message=j.message,
        new_version=j.new_version,
        window=pb.TrainingWindow(
            rows=j.window_rows,
            train_rows=j.train_rows,
            holdout_rows=j.holdout_rows,
            start=ts_or_none(j.window_start),
            end=ts_or_none(j.window_end),
        ),
        champion_metrics=j.champion_metrics,
        challenger_metrics=j.challenger_metrics,
        decision=j.decision,
        rollout_id=j.rollout_id,
        champion_version=j.champion_version,
        family=j.family,
        created_at=ts_or_none(j.created_at),
        started_at=ts_or_none(j.started_at),
        finished_at=ts_or_none(j.finished_at),
    )
