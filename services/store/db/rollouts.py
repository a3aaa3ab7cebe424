"""Rollouts and their events: what the trainer's rollout controller records at every step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from cyclone.errors import FailedPrecondition

from ._base import Conn, StoreBase
from .role_leases import RoleFence, check_role_fence
from .types import NotFoundError, StoreError

ACTIVE_STATES = ("pending", "progressing", "paused")
ROLLOUT_STATES = (*ACTIVE_STATES, "promoted", "rolled_back", "failed")

_COLS = (
    "id, model, from_version, to_version, strategy, status, current_weight, weights, reason,"
    " spec, progress, created_at, updated_at"
)
_EVENT_COLS = "rollout_id, seq, created_at, state, weight, decision, reason, numbers"


class RolloutConflictError(StoreError, FailedPrecondition):
    """The model already has an active rollout, or the rollout has ended."""


@dataclass(frozen=True, slots=True)
class RolloutEventRow:
    state: str
    weight: float
    decision: str
    reason: str = ""
    numbers: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    seq: int = 0


@dataclass(frozen=True, slots=True)
class RolloutRow:
    model: str
    to_version: str
    strategy: str
    state: str
    from_version: str | None = None
    current_weight: float = 0.0
    weights: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    id: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    events: tuple[RolloutEventRow, ...] = ()


def _row(r: Sequence[Any], events: Sequence[RolloutEventRow]) -> RolloutRow:
    (rid, model, from_v, to_v, strategy, state, weight, weights, reason, spec, progress, c, u) = r
    return RolloutRow(
        model=model,
        to_version=to_v,
        strategy=strategy,
        state=state,
        from_version=from_v,
        current_weight=float(weight),
        weights=dict(weights or {}),
        reason=reason,
        spec=dict(spec or {}),
        progress=dict(progress or {}),
        id=int(rid),
        created_at=c,
        updated_at=u,
        events=tuple(events),
    )


def _event(r: Sequence[Any]) -> RolloutEventRow:
    _, seq, created_at, state, weight, decision, reason, numbers = r
    return RolloutEventRow(state, float(weight), decision, reason, dict(numbers), created_at, seq)


class RolloutsMixin(StoreBase):
    async def insert_rollout(
        self, rollout: RolloutRow, event: RolloutEventRow, fence: RoleFence | None = None
    ) -> RolloutRow:
        """Record a new rollout and its first event; RolloutConflictError if one is active,
        LeaseLostError when `fence` no longer holds its role."""
        try:
            async with self.transaction() as c:
                if fence is not None:
                    await check_role_fence(c, fence)
                cur = await c.execute(
                    "INSERT INTO rollouts (model, from_version, to_version, strategy, status,"
                    " current_weight, weights, reason, spec, progress)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        rollout.model,
                        rollout.from_version,
                        rollout.to_version,
                        rollout.strategy,
                        rollout.state,
                        rollout.current_weight,
                        Jsonb(rollout.weights),
                        rollout.reason,
                        Jsonb(rollout.spec),
                        Jsonb(rollout.progress),
                    ),
                )
                row = await cur.fetchone()
                assert row is not None
                await self._append_events(c, int(row[0]), [event])
        except psycopg.errors.UniqueViolation:
            raise RolloutConflictError(
                f"model {rollout.model!r} already has an active rollout"
            ) from None
        found = await self.get_rollout_row(int(row[0]))
        assert found is not None
        return found

    async def update_rollout_row(
        self,
        rollout_id: int,
        state: str,
        current_weight: float,
        *,
        weights: dict[str, Any] | None = None,
        reason: str | None = None,
        progress: dict[str, Any] | None = None,
        events: Sequence[RolloutEventRow] = (),
        fence: RoleFence | None = None,
    ) -> RolloutRow:
        """Change state/weights/progress and append events in one transaction (only while
        `fence`, when given, holds its role)."""
        async with self.transaction() as c:
            if fence is not None:
                await check_role_fence(c, fence)
            cur = await c.execute(
                "SELECT status FROM rollouts WHERE id = %s FOR UPDATE", (rollout_id,)
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"rollout_id: rollout {rollout_id} not found")
            if row[0] not in ACTIVE_STATES:
                raise RolloutConflictError(
                    f"rollout_id: rollout {rollout_id} has ended ({row[0]}) and cannot change"
                )
            await c.execute(
                "UPDATE rollouts SET status = %s, current_weight = %s,"
                " weights = coalesce(%s, weights), reason = coalesce(%s, reason),"
                " progress = coalesce(%s, progress), updated_at = now() WHERE id = %s",
                (
                    state,
                    current_weight,
                    None if weights is None else Jsonb(weights),
                    reason,
                    None if progress is None else Jsonb(progress),
                    rollout_id,
                ),
            )
            await self._append_events(c, rollout_id, events)
        found = await self.get_rollout_row(rollout_id)
        assert found is not None
        return found

    async def _append_events(
        self, c: Conn, rollout_id: int, events: Sequence[RolloutEventRow]
    ) -> None:
        if not events:
            return
        cur = await c.execute(
            "SELECT coalesce(max(seq), 0) FROM rollout_events WHERE rollout_id = %s",
            (rollout_id,),
        )
        row = await cur.fetchone()
        seq = int(row[0]) if row else 0
        async with c.cursor() as cur2:
            await cur2.executemany(
                "INSERT INTO rollout_events (rollout_id, seq, created_at, state, weight, decision,"
                " reason, numbers) VALUES (%s, %s, coalesce(%s, now()), %s, %s, %s, %s, %s)",
                [
                    (
                        rollout_id,
                        seq + i + 1,
                        e.created_at,
                        e.state,
                        e.weight,
                        e.decision,
                        e.reason,
                        Jsonb(e.numbers),
                    )
                    for i, e in enumerate(events)
                ],
            )

    async def get_rollout_row(self, rollout_id: int) -> RolloutRow | None:
        rows = await self._select("WHERE id = %(id)s", {"id": rollout_id}, 1)
        return rows[0] if rows else None

    async def list_rollout_rows(
        self, model: str | None = None, active_only: bool = False, limit: int = 50
    ) -> list[RolloutRow]:
        """Newest first, each with its events."""
        return await self._select(
            "WHERE (%(m)s::text IS NULL OR model = %(m)s::text)"
            " AND (NOT %(a)s OR status = ANY(%(active)s))",
            {"m": model, "a": active_only, "active": list(ACTIVE_STATES)},
            limit,
        )

    async def _select(self, where: str, params: dict[str, Any], limit: int) -> list[RolloutRow]:
        async with self.pool.connection() as c:
            cur = await c.execute(
                f"SELECT {_COLS} FROM rollouts {where} ORDER BY id DESC LIMIT %(limit)s",
                {**params, "limit": limit},
            )
            heads = await cur.fetchall()
            if not heads:
                return []
            cur = await c.execute(
                f"SELECT {_EVENT_COLS} FROM rollout_events WHERE rollout_id = ANY(%s)"
                " ORDER BY rollout_id, seq",
                ([int(h[0]) for h in heads],),
            )
            by_id: dict[int, list[RolloutEventRow]] = {}
            for r in await cur.fetchall():
                by_id.setdefault(int(r[0]), []).append(_event(r))
        return [_row(h, by_id.get(int(h[0]), [])) for h in heads]
