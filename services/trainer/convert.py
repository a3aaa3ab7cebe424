"""Protobuf <-> the trainer's domain (rollouts); jobs are converted in the servicer."""

from __future__ import annotations

from cyclone import rollout_strategies
from cyclone.errors import InvalidArgument
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.wire import ts_or_none
from services.trainer.rollout import Rollout, RolloutState, RolloutStep

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
