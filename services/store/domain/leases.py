"""Model leases: how several monitors share the models (docs/scaling-out.md)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from cyclone.errors import InvalidArgument
from services.store.db import LeaseOutcome, StoreDB

from .checks import name, require

MAX_LEASE_SECONDS = 3600
MAX_LEASED_MODELS = 100_000
MAX_HOLDER_LENGTH = 200


def holder_id(holder: str) -> str:
    require("holder", holder.strip())
    if len(holder) > MAX_HOLDER_LENGTH:
        raise InvalidArgument(f"holder: at most {MAX_HOLDER_LENGTH} characters")
    return holder


class LeasesArea:
    db: StoreDB

    async def lease_models(
        self, holder: str, models: Sequence[str], lease_seconds: int
    ) -> LeaseOutcome:
        holder_id(holder)
        if not 1 <= lease_seconds <= MAX_LEASE_SECONDS:
            raise InvalidArgument(
                f"lease_seconds: must be between 1 and {MAX_LEASE_SECONDS}, got {lease_seconds}"
            )
        if len(models) > MAX_LEASED_MODELS:
            raise InvalidArgument(f"models: at most {MAX_LEASED_MODELS}, got {len(models)}")
        for index, model in enumerate(models):
            name(f"models[{index}]", model)
        return await self.db.lease_models(holder, models, timedelta(seconds=lease_seconds))

    async def release_model_leases(self, holder: str) -> int:
        return await self.db.release_model_leases(holder_id(holder))
