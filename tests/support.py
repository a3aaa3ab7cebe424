"""Helpers every test module shares: expected gRPC errors, waiting for a condition, free ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from services.launch import free_port

__all__ = ["eventually", "expect_error", "free_port"]


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, *fragments: str) -> str:
    """Await `call`, which must fail with `code` and details containing every fragment."""
    with pytest.raises(aio.AioRpcError) as info:
        await call
    details = info.value.details() or ""
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)
