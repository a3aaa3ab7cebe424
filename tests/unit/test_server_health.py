"""Health says SERVING only once a server's start-up work is done (launchers wait on it)."""

from __future__ import annotations

import asyncio

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings


async def test_not_serving_until_the_start_hooks_finish() -> None:
    server = CycloneServer("probe", ServerSettings(port=0, log_level="WARNING"))
    seen: list[int] = []
    release = asyncio.Event()

    async def slow_start() -> None:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            seen.append(check.status)
        await release.wait()

    server.on_start(slow_start)
    starting = asyncio.create_task(server.start())
    while not seen:
        await asyncio.sleep(0.01)
    release.set()
    port = await starting
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        after = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await server.stop(0)
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert after.status == health_pb2.HealthCheckResponse.SERVING
