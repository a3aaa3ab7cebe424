"""Rollouts as the trainer's rollout controller records them: one row per rollout, an event
per step, at most one active rollout per model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cyclone.errors import InvalidArgument, NotFound
from cyclone.rollout_strategies import STRATEGIES
from services.store.db import RoleFence, StoreDB
from services.store.db.rollouts import ROLLOUT_STATES, RolloutEventRow, RolloutRow

from .checks import finite_numbers, found, limit, one_of, percent, positive, require
from .registry import require_known_model
from .role_leases import check_fence

MAX_LIST = 1000


@dataclass(frozen=True)
class RolloutUpdate:
    """UpdateRollout: the new state and weight, what else changed (None: unchanged) and the
    events to append."""

    rollout_id: int
    state: str
    current_weight: float
    weights: dict[str, Any] | None = None
    reason: str | None = None
    progress: dict[str, Any] | None = None
    events: Sequence[RolloutEventRow] = ()
    # The role lease the write is made under (the leading trainer's), checked by the store.
    fence: RoleFence | None = None


def check_event(event: RolloutEventRow, field: str) -> RolloutEventRow:
    require(f"{field}.decision", event.decision)
    finite_numbers(f"{field}.numbers", event.numbers)
    one_of(f"{field}.state", event.state, ROLLOUT_STATES)
    percent(f"{field}.weight", event.weight)
    return event


class RolloutsArea:
    db: StoreDB

    async def create_rollout(
        self,
        rollout: RolloutRow,
        first_event: RolloutEventRow | None,
        fence: RoleFence | None = None,
    ) -> RolloutRow:
        """Record a new rollout with its first event (FAILED_PRECONDITION while the model has
        an active one)."""
        require("rollout.model", rollout.model)
        require("rollout.to_version", rollout.to_version)
        one_of("rollout.strategy", rollout.strategy, STRATEGIES)
        if first_event is None:
            raise InvalidArgument("event: missing (a rollout starts with its first event)")
        one_of("rollout.state", rollout.state, ROLLOUT_STATES)
        percent("rollout.current_weight", rollout.current_weight)
        check_event(first_event, "event")
        if await self.db.get_model_version(rollout.model, rollout.to_version) is None:
            raise NotFound(
                f"rollout.to_version: model {rollout.model!r} has no version {rollout.to_version!r}"
            )
        return await self.db.insert_rollout(rollout, first_event, check_fence(fence))

    async def update_rollout(self, update: RolloutUpdate) -> RolloutRow:
        """Record a step: FAILED_PRECONDITION once the rollout has ended."""
        positive("rollout_id", update.rollout_id)
        one_of("state", update.state, ROLLOUT_STATES)
        percent("current_weight", update.current_weight)
        for i, event in enumerate(update.events):
            check_event(event, f"events[{i}]")
        return await self.db.update_rollout_row(
            update.rollout_id,
            update.state,
            update.current_weight,
            weights=update.weights,
            reason=update.reason,
            progress=update.progress,
            events=update.events,
            fence=check_fence(update.fence),
        )

    async def get_rollout(self, rollout_id: int) -> RolloutRow:
        return found(
            await self.db.get_rollout_row(positive("rollout_id", rollout_id)),
            f"rollout_id: rollout {rollout_id} not found",
        )

    async def list_rollouts(self, model: str, active_only: bool, count: int) -> list[RolloutRow]:
        """Newest first, each with its events."""
        count = limit("limit", count, MAX_LIST, 50)
        rows = await self.db.list_rollout_rows(model or None, active_only, count)
        if not rows:
            await require_known_model(self.db, model)
        return rows
