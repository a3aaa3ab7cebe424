"""Role leases: one instance at a time plays a named role (docs/scaling-out.md)."""

from __future__ import annotations

import math
from datetime import timedelta

from cyclone.errors import InvalidArgument
from services.store.db import RoleFence, RoleLease, StoreDB

from .checks import name
from .leases import MAX_LEASE_SECONDS, holder_id

MIN_ROLE_LEASE_SECONDS = 0.5
MAX_ADDRESS_LENGTH = 300


def check_fence(fence: RoleFence | None) -> RoleFence | None:
    """A write's fence, checked like the lease it names (None: an unfenced write)."""
    if fence is None:
        return None
    name("fence.role", fence.role)
    require_holder("fence.holder", fence.holder)
    if fence.epoch <= 0:
        raise InvalidArgument(f"fence.epoch: must be positive, got {fence.epoch}")
    return fence


def require_holder(field: str, holder: str) -> str:
    try:
        return holder_id(holder)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}{str(exc).removeprefix('holder')}") from None


class RoleLeasesArea:
    db: StoreDB

    async def acquire_role_lease(
        self, role: str, holder: str, lease_seconds: float, epoch: int, address: str
    ) -> tuple[bool, RoleLease]:
        name("role", role)
        holder_id(holder)
        if not (
            math.isfinite(lease_seconds)
            and MIN_ROLE_LEASE_SECONDS <= lease_seconds <= MAX_LEASE_SECONDS
        ):
            raise InvalidArgument(
                f"lease_seconds: must be between {MIN_ROLE_LEASE_SECONDS:g} and"
                f" {MAX_LEASE_SECONDS}, got {lease_seconds:g}"
            )
        if epoch < 0:
            raise InvalidArgument(f"epoch: must be 0 (none yet) or more, got {epoch}")
        if len(address) > MAX_ADDRESS_LENGTH:
            raise InvalidArgument(f"address: at most {MAX_ADDRESS_LENGTH} characters")
        return await self.db.acquire_role_lease(
            role, holder, timedelta(seconds=lease_seconds), epoch, address
        )

    async def release_role_lease(self, role: str, holder: str, epoch: int) -> bool:
        name("role", role)
        holder_id(holder)
        if epoch <= 0:
            raise InvalidArgument(f"epoch: must be positive, got {epoch}")
        return await self.db.release_role_lease(role, holder, epoch)
