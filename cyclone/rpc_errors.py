"""The one error mapper: every servicer method of every service runs under `rpc_errors`.

Servicers raise domain errors (`cyclone.errors`); this turns them into gRPC statuses in one
place. A service passes a translator for the errors only it knows (the store maps database
errors to UNAVAILABLE); an upstream `grpc.RpcError` keeps its status and details; anything else
is INTERNAL with the exception's type (never its text, which may carry user data).

    class StoreServicer(pb_grpc.StoreServiceServicer):
        @rpc_errors(translate=database_errors)
        async def GetModel(self, request, context): ...

        @rpc_errors(translate=database_errors)
        async def WatchThings(self, request, context):   # async generators work too
            yield ...
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from grpc import aio

from cyclone.errors import CycloneError

log = logging.getLogger(__name__)

# Returns the domain error an exception means for this service, or None if it does not know it.
Translator = Callable[[BaseException], CycloneError | None]

F = TypeVar("F", bound=Callable[..., Any])


class UpstreamError(CycloneError):
    """Another service answered with an error: its status, with where it came from."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def upstream(name: str) -> Translator:
    """A translator for calls to another service (`name`): its status is kept, a deadline it
    missed becomes UNAVAILABLE (retryable), and the details say which service answered."""

    def translate(exc: BaseException) -> CycloneError | None:
        if isinstance(exc, grpc.RpcError) and isinstance(exc, aio.AioRpcError | grpc.Call):
            code = exc.code()
            passed = (
                grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.DEADLINE_EXCEEDED else code
            )
            return UpstreamError(passed, f"{name}: {exc.details() or code.name}")
        return None

    return translate


def status_for(
    exc: BaseException, translate: Translator | None = None
) -> tuple[grpc.StatusCode, str]:
    """The status code and details a failed RPC answers with."""
    if translate is not None:
        translated = translate(exc)
        if translated is not None:
            exc = translated
    if isinstance(exc, CycloneError):
        return exc.code, exc.message
    if isinstance(exc, aio.AioRpcError) or (
        isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call)
    ):
        # An upstream service answered with a status: keep it, say where it came from.
        return exc.code(), exc.details() or exc.code().name
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


async def abort_with(
    context: aio.ServicerContext[Any, Any], exc: BaseException, translate: Translator | None = None
) -> None:
    code, details = status_for(exc, translate)
    await context.abort(code, details)


def rpc_errors(translate: Translator | None = None) -> Callable[[F], F]:
    """Decorate a servicer method (`self, request_or_iterator, context`), unary or streaming."""

    def decorate(method: F) -> F:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(
                self: Any, request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for item in method(self, request, context):
                        yield item
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await abort_with(context, exc, translate)

            return cast(F, streaming)

        @functools.wraps(method)
        async def unary(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await method(self, request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc, translate)
                raise AssertionError("unreachable: abort raises") from exc

        _UNARY[unary] = (method, translate)
        return cast(F, unary)

    return decorate


# Unary methods decorated above: the decorator's function -> (the method, its translator).
_UNARY: dict[Callable[..., Any], tuple[Callable[..., Any], Translator | None]] = {}

UnaryCall = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


def undecorated_unary(behavior: Any) -> tuple[UnaryCall, Translator | None] | None:
    """For a bound unary method decorated with `rpc_errors`: the bound method without the
    decorator, and its translator; None for anything else.

    The server's registration (`cyclone.instrumentation`) maps errors itself in the one
    coroutine it wraps around each call: a coroutine layer per call is measurable on a
    one-row prediction. Called directly, a decorated method still maps its own errors."""
    entry = _UNARY.get(getattr(behavior, "__func__", None))  # type: ignore[arg-type]
    if entry is None:
        return None
    method, translate = entry
    return types.MethodType(method, behavior.__self__), translate
