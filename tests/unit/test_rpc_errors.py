"""The one error mapper, on a real grpc.aio server: every kind of failure gets its status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.errors import CycloneError, InvalidArgument, NotFound, Unavailable
from cyclone.instrumentation import instrument
from cyclone.rpc_errors import rpc_errors, undecorated_unary


class _DatabaseDown(Exception):
    pass


def _translate(exc: BaseException) -> CycloneError | None:
    return Unavailable("database unavailable") if isinstance(exc, _DatabaseDown) else None


class _Upstream(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed upstream stub call raises."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "store: queue full"

    def initial_metadata(self) -> Any:
        return None

    def trailing_metadata(self) -> Any:
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


FAILURES: dict[str, BaseException] = {
    "invalid": InvalidArgument("rows[0].age: must be a number"),
    "missing": NotFound("model: 'nope' is not registered"),
    "database": _DatabaseDown("connection refused to secret-host"),
    "upstream": _Upstream(),
    "aio_upstream": aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, aio.Metadata(), aio.Metadata(), details="store: no such alert"
    ),
    "bug": KeyError("user text that must not leak"),
}


class _Servicer:
    @rpc_errors(translate=_translate)
    async def unary(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        kind = request.decode()
        if kind == "ok":
            return b"fine"
        raise FAILURES[kind]

    @rpc_errors(translate=_translate)
    async def stream(
        self, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield b"first"
        raise FAILURES[request.decode()]


@pytest.fixture(params=["decorator", "registration"])
async def channel(request: pytest.FixtureRequest) -> AsyncIterator[aio.Channel]:
    """The servicer on a bare server (the decorator maps errors) and wrapped as Cyclone's
    server registers it (`instrument` maps them in its one coroutine around the method)."""
    servicer = _Servicer()
    identity = dict(request_deserializer=None, response_serializer=None)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary, **identity),  # type: ignore[arg-type]
        "Stream": grpc.unary_stream_rpc_method_handler(servicer.stream, **identity),  # type: ignore[arg-type]
    }
    if request.param == "registration":
        handlers = {name: instrument(f"/t.T/{name}", h) for name, h in handlers.items()}
    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


EXPECTED = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "rows[0].age: must be a number"),
    "missing": (grpc.StatusCode.NOT_FOUND, "model: 'nope' is not registered"),
    "database": (grpc.StatusCode.UNAVAILABLE, "database unavailable"),
    "upstream": (grpc.StatusCode.RESOURCE_EXHAUSTED, "store: queue full"),
    "aio_upstream": (grpc.StatusCode.NOT_FOUND, "store: no such alert"),
    "bug": (grpc.StatusCode.INTERNAL, "internal error: KeyError"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_unary_failures_map_to_their_status(channel: aio.Channel, kind: str) -> None:
    call = channel.unary_unary("/t.T/Unary")
    with pytest.raises(aio.AioRpcError) as err:
        await call(kind.encode())
    assert (err.value.code(), err.value.details()) == EXPECTED[kind]
    assert "secret-host" not in (err.value.details() or "")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_streaming_failures_map_after_the_items_already_sent(
    channel: aio.Channel, kind: str
) -> None:
    received: list[bytes] = []
    with pytest.raises(aio.AioRpcError) as err:
        async for item in channel.unary_stream("/t.T/Stream")(kind.encode()):
            received.append(item)
    assert received == [b"first"]
    assert (err.value.code(), err.value.details()) == EXPECTED[kind]


async def test_success_passes_through(channel: aio.Channel) -> None:
    assert await channel.unary_unary("/t.T/Unary")(b"ok") == b"fine"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.FAILED_PRECONDITION),
        (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE),  # retryable
    ],
)
def test_upstream_keeps_the_status_and_names_the_service(
    code: grpc.StatusCode, expected: grpc.StatusCode
) -> None:
    from cyclone.rpc_errors import status_for, upstream

    failed = aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details="no such model")
    assert status_for(failed, upstream("store")) == (expected, "store: no such model")
    assert status_for(KeyError("x"), upstream("store"))[0] == grpc.StatusCode.INTERNAL


def test_registration_finds_the_undecorated_unary_method_and_its_translator() -> None:
    servicer = _Servicer()
    found = undecorated_unary(servicer.unary)
    assert found is not None
    call, translate = found
    assert call.__func__ is _Servicer.unary.__wrapped__  # type: ignore[attr-defined]
    assert call.__self__ is servicer  # type: ignore[attr-defined]
    assert translate is _translate
    # Streaming methods and plain functions keep their own wrapping.
    assert undecorated_unary(servicer.stream) is None
    assert undecorated_unary(_translate) is None
