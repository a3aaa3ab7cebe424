"""Model leases: how several monitors share the models (one holder per model at a time)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cyclone.errors import FailedPrecondition

from ._base import Conn, StoreBase
from .types import StoreError

# Serialises lease calls: each is a handful of statements on small tables once per monitor
# tick, and a fair share needs a consistent count of holders and leases.
LEASE_LOCK_KEY = 0x6C65617365  # "lease" in ASCII


class LeaseLostError(StoreError, FailedPrecondition):
    """The caller no longer holds the lease it acts under."""


async def check_lease(conn: Conn, model: str, holder: str) -> None:
    """Raise LeaseLostError unless `holder` holds `model`'s unexpired lease; the lease row
    stays locked (shared) until the caller's transaction ends."""
    cur = await conn.execute(
        "SELECT 1 FROM model_leases WHERE model = %s AND holder = %s AND expires_at > now()"
        " FOR SHARE",
        (model, holder),
    )
    if await cur.fetchone() is None:
        raise LeaseLostError(
            f"lease_holder: {holder!r} does not hold the lease of model {model!r}"
            " (it ended or another monitor took it)"
        )


@dataclass(frozen=True, slots=True)
class ModelLease:
    model: str
    expires_at: datetime
    acquired: bool  # taken in this call
    last_evaluated_at: datetime | None


@dataclass(frozen=True, slots=True)
class LeaseOutcome:
    leases: list[ModelLease]
    holders: int
    fair_share: int


class LeasesMixin(StoreBase):
    async def lease_models(
        self, holder: str, models: Sequence[str], lease: timedelta
    ) -> LeaseOutcome:
        """Renew `holder`'s heartbeat and its leases on `models`, release what it holds past
        the fair share (ceil(models / live holders)) and take free or expired leases up to it.

        One transaction under an advisory lock, so two holders never take the same model and
        the share is computed on a consistent count. Leases on models not in `models` are
        released (the caller no longer serves them)."""
        wanted = sorted(set(models))
        async with self.transaction() as c:
            await c.execute("SELECT pg_advisory_xact_lock(%s)", (LEASE_LOCK_KEY,))
            await c.execute(
                "INSERT INTO lease_holders (holder, expires_at) VALUES (%s, now() + %s)"
                " ON CONFLICT (holder) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                (holder, lease),
            )
            await c.execute("DELETE FROM lease_holders WHERE expires_at < now()")
            await c.execute(
                "DELETE FROM model_leases WHERE expires_at < now()"
                " OR (holder = %s AND NOT model = ANY(%s))",
                (holder, wanted),
            )
            cur = await c.execute("SELECT count(*) FROM lease_holders")
            row = await cur.fetchone()
            holders = max(1, int(row[0]) if row else 1)
            share = math.ceil(len(wanted) / holders)
            cur = await c.execute(
                "UPDATE model_leases SET expires_at = now() + %s WHERE holder = %s RETURNING model",
                (lease, holder),
            )
            held = sorted(str(r[0]) for r in await cur.fetchall())
            if len(held) > share:
                # Keep the first `share` by name: a stable choice, so repeated calls do not
                # shuffle models between holders.
                await c.execute(
                    "DELETE FROM model_leases WHERE holder = %s AND model = ANY(%s)",
                    (holder, held[share:]),
                )
                held = held[:share]
            acquired: list[str] = []
            if len(held) < share:
                cur = await c.execute(
                    "INSERT INTO model_leases (model, holder, expires_at)"
                    " SELECT m, %s, now() + %s FROM unnest(%s::text[]) AS m"
                    " WHERE NOT EXISTS (SELECT 1 FROM model_leases l WHERE l.model = m)"
                    " ORDER BY m LIMIT %s RETURNING model",
                    (holder, lease, wanted, share - len(held)),
                )
                acquired = [str(r[0]) for r in await cur.fetchall()]
            evaluated: dict[str, datetime] = {}
            if acquired:  # only a model new to the holder needs its last evaluation
                cur = await c.execute(
                    "SELECT model, max(evaluated_at) FROM model_health WHERE model = ANY(%s)"
                    " GROUP BY model",
                    (acquired,),
                )
                evaluated = {str(m): at for m, at in await cur.fetchall()}
            cur = await c.execute(
                "SELECT model, expires_at FROM model_leases WHERE holder = %s ORDER BY model",
                (holder,),
            )
            taken = set(acquired)
            leases = [
                ModelLease(str(m), expires, str(m) in taken, evaluated.get(str(m)))
                for m, expires in await cur.fetchall()
            ]
        return LeaseOutcome(leases, holders, share)

    async def release_model_leases(self, holder: str) -> int:
        """End `holder`'s leases and heartbeat now; how many leases it had."""
        async with self.transaction() as c:
            await c.execute("SELECT pg_advisory_xact_lock(%s)", (LEASE_LOCK_KEY,))
            cur = await c.execute("DELETE FROM model_leases WHERE holder = %s", (holder,))
            released = cur.rowcount
            await c.execute("DELETE FROM lease_holders WHERE holder = %s", (holder,))
        return max(0, released)
