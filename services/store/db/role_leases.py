"""Role leases: one holder at a time for a named role (the trainers' traffic plane), with an
epoch that fences writes made by a holder that lost the role (docs/scaling-out.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ._base import Conn, StoreBase
from .leases import LeaseLostError


@dataclass(frozen=True, slots=True)
class RoleLease:
    role: str
    holder: str
    epoch: int
    expires_at: datetime
    address: str


@dataclass(frozen=True, slots=True)
class RoleFence:
    """The role lease a write is made under."""

    role: str
    holder: str
    epoch: int


async def check_role_fence(conn: Conn, fence: RoleFence) -> None:
    """Raise LeaseLostError unless `fence` names the role's current, unexpired lease; the row
    stays locked (shared) until the caller's transaction ends, so no takeover slips in."""
    cur = await conn.execute(
        "SELECT 1 FROM role_leases WHERE role = %s AND holder = %s AND epoch = %s"
        " AND expires_at > now() FOR SHARE",
        (fence.role, fence.holder, fence.epoch),
    )
    if await cur.fetchone() is None:
        raise LeaseLostError(
            f"fence: {fence.holder!r} (epoch {fence.epoch}) no longer holds role {fence.role!r}"
            " (its lease ended or another instance took it)"
        )


class RoleLeasesMixin(StoreBase):
    async def acquire_role_lease(
        self, role: str, holder: str, lease: timedelta, epoch: int, address: str
    ) -> tuple[bool, RoleLease]:
        """Renew `holder`'s lease on `role` (same epoch, not taken by another meanwhile) or take
        the role when it is free, expired or held by `holder` under another epoch (its
        restart, or a lost reply), with the next epoch. Returns whether `holder` holds it and the lease as it stands."""
        async with self.transaction() as c:
            cur = await c.execute(
                "SELECT holder, epoch, expires_at > now() FROM role_leases WHERE role = %s"
                " FOR UPDATE",
                (role,),
            )
            row = await cur.fetchone()
            if row is None:
                cur = await c.execute(
                    "INSERT INTO role_leases (role, holder, epoch, address, expires_at)"
                    " VALUES (%s, %s, 1, %s, now() + %s)"
                    " ON CONFLICT (role) DO NOTHING RETURNING epoch",
                    (role, holder, address, lease),
                )
                taken = await cur.fetchone() is not None
            else:
                current_holder, current_epoch, live = str(row[0]), int(row[1]), bool(row[2])
                taken = False
                # The holder's own epoch: renewed even after it expired, as long as nobody
                # took the role meanwhile (then no other epoch wrote anything in between).
                if current_holder == holder and current_epoch == epoch:
                    await c.execute(
                        "UPDATE role_leases SET expires_at = now() + %s, address = %s"
                        " WHERE role = %s",
                        (lease, address, role),
                    )
                    taken = True
                elif not live or current_holder == holder:
                    await c.execute(
                        "UPDATE role_leases SET holder = %s, epoch = epoch + 1, address = %s,"
                        " acquired_at = now(), expires_at = now() + %s WHERE role = %s",
                        (holder, address, lease, role),
                    )
                    taken = True
            cur = await c.execute(
                "SELECT role, holder, epoch, expires_at, address FROM role_leases WHERE role = %s",
                (role,),
            )
            found = await cur.fetchone()
        assert found is not None
        current = RoleLease(str(found[0]), str(found[1]), int(found[2]), found[3], str(found[4]))
        return taken and current.holder == holder, current

    async def release_role_lease(self, role: str, holder: str, epoch: int) -> bool:
        """End `holder`'s lease (epoch `epoch`) now; False when it did not hold it. The row
        stays, expired, so the next holder's epoch is still higher."""
        async with self.transaction() as c:
            cur = await c.execute(
                "UPDATE role_leases SET expires_at = '-infinity' WHERE role = %s AND holder = %s"
                " AND epoch = %s AND expires_at > now()",
                (role, holder, epoch),
            )
            return cur.rowcount > 0
