"""Maps domain and store errors of a store RPC to gRPC status codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpc import aio

from cyclone.errors import InvalidArgument, NotFound
from cyclone.server import abort_on_domain_errors
from services.store.db import AlreadyExistsError, NotFoundError

T = TypeVar("T")


async def guard(context: aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`, mapping domain and store errors to status codes."""
    try:
        return await call()
    except NotFoundError as exc:
        await context.abort(NotFound.code, str(exc))
    except AlreadyExistsError as exc:
        await context.abort(InvalidArgument.code, str(exc))
    except Exception as exc:
        await abort_on_domain_errors(context, exc)
    raise AssertionError("unreachable")
