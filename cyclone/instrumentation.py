"""Request id, Prometheus counters and latency per RPC, wrapped around each handler.

The wrapping happens once, when a servicer is registered (see `CycloneServer.add_service`),
not in a grpc.aio interceptor: an interceptor runs per call and cost about 100 µs of
server CPU per request here, a quarter of a small Predict. Health and reflection calls
are not counted: they would drown the real traffic.
"""

from __future__ import annotations

import contextvars
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Counter, Histogram

from cyclone.auth import Admission, TokenSet, admission, guard
from cyclone.rpc_errors import Translator, UnaryCall, abort_with, undecorated_unary

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUESTS = Counter("cyclone_grpc_requests", "gRPC requests handled", ["service", "method"])
ERRORS = Counter("cyclone_grpc_errors", "gRPC requests that failed", ["service", "method", "code"])
LATENCY = Histogram(
    "cyclone_grpc_latency_seconds",
    "gRPC request latency",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)

_SKIPPED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_HEADER = "x-request-id"


class _MethodMetrics:
    """Pre-resolved metric children: `.labels()` is too slow for the hot path."""

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.service, self.method = service, method
        self.requests = REQUESTS.labels(service, method)
        self.latency = LATENCY.labels(service, method)

    def error(self, code: grpc.StatusCode) -> None:
        ERRORS.labels(self.service, self.method, code.name).inc()


def _new_request_id() -> str:
    """A uuid4 hex, from the (fork-safe) `random` generator: `uuid.uuid4()` reads
    os.urandom, a syscall that drops the GIL on every call and lets gRPC's poller
    thread take it, which stalls the event loop. Request ids need not be secret."""
    bits = random.getrandbits(128)
    bits = (bits & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    return f"{bits:032x}"


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return str(value)
    return _new_request_id()


def _failed_code(
    context: aio.ServicerContext[Any, Any], exc: BaseException | None
) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return None if code == grpc.StatusCode.OK else code
    if isinstance(code, int) and code != 0:
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is not None:
        return grpc.StatusCode.UNKNOWN
    return None


def instrument(
    full_method: str, handler: grpc.RpcMethodHandler, tokens: TokenSet | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with request id, metrics and, with `tokens`, the method's access check
    (`cyclone.auth`) around it; health and reflection get the access check only.

    A unary-unary servicer method decorated with `rpc_errors` gets all of it, error mapping
    included, in one coroutine around the undecorated method: each coroutine layer costs a
    few per cent of a one-row prediction's throughput.
    """
    skipped = full_method.startswith(_SKIPPED)
    direct = None if skipped or not handler.unary_unary else undecorated_unary(handler.unary_unary)
    if direct is None:
        guarded = handler if tokens is None else guard(full_method, handler, tokens)
        return guarded if skipped else _wrap(guarded, _MethodMetrics(full_method))
    call, translate = direct
    return _unary_in_one(
        handler, _MethodMetrics(full_method), admission(full_method, tokens), call, translate
    )


def _begin(context: aio.ServicerContext[Any, Any], m: _MethodMetrics) -> float:
    rid = _request_id(context.invocation_metadata())
    request_id_var.set(rid)  # each RPC runs in its own task, so its own context
    context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
    m.requests.inc()
    return time.perf_counter()


def _end(
    context: aio.ServicerContext[Any, Any],
    m: _MethodMetrics,
    started: float,
    exc: BaseException | None,
) -> None:
    m.latency.observe(time.perf_counter() - started)
    code = _failed_code(context, exc)
    if code is not None:
        m.error(code)


def _unary_in_one(
    handler: grpc.RpcMethodHandler,
    m: _MethodMetrics,
    admit: Admission | None,
    call: UnaryCall,
    translate: Translator | None,
) -> grpc.RpcMethodHandler:
    async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started, exc = _begin(context, m), None
        try:
            if admit is not None:
                verdict = admit(context.invocation_metadata())
                if verdict is not None:
                    await context.abort(*verdict)
            return await call(request, context)
        except aio.AbortError as e:
            exc = e
            raise
        except Exception as e:
            exc = e
            await abort_with(context, e, translate)
            raise AssertionError("unreachable: abort raises") from e
        except BaseException as e:
            exc = e
            raise
        finally:
            _end(context, m, started, exc)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=_serialized_or(handler.response_serializer),
    )


def _serialized_or(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serializer`, except that a response a handler serialized itself passes as it is
    (a hot path may build its bytes from cached parts; see services/inference/convert.py)."""
    if serializer is None:
        return None
    serialize = serializer

    def serialized_or(response: Any) -> bytes:
        return response if response.__class__ is bytes else serialize(response)

    return serialized_or


def _wrap(handler: grpc.RpcMethodHandler, m: _MethodMetrics) -> grpc.RpcMethodHandler:
    """Request id and metrics around any handler, as a coroutine layer of its own."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": _serialized_or(handler.response_serializer),
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started, exc = _begin(context, m), None
            try:
                return await inner_uu(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                _end(context, m, started, exc)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started, exc = _begin(context, m), None
            try:
                return await inner_su(requests, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                _end(context, m, started, exc)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started, exc = _begin(context, m), None
        try:
            async for item in inner_stream(request, context):
                yield item
        except BaseException as e:
            exc = e
            raise
        finally:
            _end(context, m, started, exc)

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
