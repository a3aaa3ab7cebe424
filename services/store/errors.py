"""The store's translator for `rpc_errors`: database trouble is UNAVAILABLE (retryable)."""

from __future__ import annotations

import psycopg
from psycopg_pool import PoolTimeout

from cyclone.errors import CycloneError, Unavailable


def database_errors(exc: BaseException) -> CycloneError | None:
    """The database is down or overloaded: a retryable condition, not a bug."""
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return Unavailable(f"database unavailable: {exc}")
    return None
