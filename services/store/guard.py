"""Maps domain and store errors of a store RPC to gRPC status codes, in one place."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from grpc import aio
from psycopg_pool import PoolTimeout

from cyclone.errors import InvalidArgument, NotFound, Unavailable
from cyclone.server import abort_on_domain_errors
from services.store.db import AlreadyExistsError, NotFoundError

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")


async def guard(context: aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`, mapping domain and store errors to status codes."""
    try:
        return await call()
    except NotFoundError as exc:
        await context.abort(NotFound.code, str(exc))
    except AlreadyExistsError as exc:
        await context.abort(InvalidArgument.code, str(exc))
    except (psycopg.OperationalError, PoolTimeout) as exc:
        # The database is down or overloaded: a retryable condition, not a bug.
        await context.abort(Unavailable.code, f"database unavailable: {exc}")
    except Exception as exc:
        await abort_on_domain_errors(context, exc)
    raise AssertionError("unreachable")


def store_rpc(
    method: Callable[[S, R], Awaitable[T]],
) -> Callable[[S, R, aio.ServicerContext[Any, Any]], Awaitable[T]]:
    """Turn `async def Rpc(self, request) -> Response` into a servicer method with errors mapped."""

    @functools.wraps(method)
    async def handler(self: S, request: R, context: aio.ServicerContext[Any, Any]) -> T:
        return await guard(context, lambda: method(self, request))

    return handler
