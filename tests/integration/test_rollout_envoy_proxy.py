"""What the rollout controller needs from the Envoy proxy, against a real Envoy: a revision added
at 0 % (routes unchanged) installs promptly, and `stats` reports recent latency and failed
health checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cyclone.channels import aio_channel
from cyclone.client import build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.traffic import Endpoint, Revision, TrafficSplit

if TYPE_CHECKING:
    from tests.conftest import ModelRepo, RunningServer

pytestmark = pytest.mark.integration

CREDIT = "credit"
StartServer = Callable[..., contextlib.AbstractAsyncContextManager["RunningServer"]]


def revision(version: str, port: int) -> Revision:
    return Revision(CREDIT, version, (Endpoint("127.0.0.1", port),))


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[EnvoyProxy]:
    settings = EnvoySettings(
        work_dir=tmp_path / "envoy",
        public_host="127.0.0.1",
        public_port=0,
        control_port=0,
        concurrency=1,
        health_interval_s=0.25,
    )
    async with EnvoyProxy(settings) as proxy:
        yield proxy


async def test_a_revision_added_at_zero_percent_installs_without_a_route_change(
    envoy: EnvoyProxy, start_inference_server: StartServer
) -> None:
    async with start_inference_server() as one, start_inference_server() as two:
        champion, challenger = revision("1", one.port), revision("2", two.port)
        await envoy.apply(TrafficSplit(CREDIT, {champion.name: 100}, {champion.name: champion}))
        routes = envoy.layout.rds("public").read_text()
        started = time.monotonic()
        # Same routes (a 0 % revision is not in weighted_clusters): Envoy keeps the old route
        # version, so waiting for a new one would time out.
        await envoy.apply(
            TrafficSplit(
                CREDIT,
                {champion.name: 100, challenger.name: 0},
                {champion.name: champion, challenger.name: challenger},
            )
        )
        assert time.monotonic() - started < 10
        assert envoy.layout.rds("public").read_text() == routes
        await envoy.wait_healthy(challenger, 10)
        # And a real route change still installs.
        await envoy.apply(
            TrafficSplit(
                CREDIT,
                {champion.name: 50, challenger.name: 50},
                {champion.name: champion, challenger.name: challenger},
            )
        )
        assert envoy.layout.rds("public").read_text() != routes


async def test_stats_report_recent_latency_and_failed_health_checks(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    rows = model_repo.credit_rows.iloc[:1].to_dict(orient="records")
    async with start_inference_server() as server:
        rev = revision("1", server.port)
        await envoy.apply(TrafficSplit(CREDIT, {rev.name: 100}, {rev.name: rev}))
        await envoy.wait_healthy(rev, 10)
        async with aio_channel(envoy.public_address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 10
            while True:  # the recent window is the last stats flush (1 s)
                for _ in range(20):
                    await stub.Predict(build_request(CREDIT, rows))
                stats = await envoy.stats(rev.name)
                if "latency_ms_p99_recent" in stats.extra or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        assert stats.extra["recent_window_s"] == 1.0
        assert stats.extra["latency_ms_p99_recent"] > 0
        assert stats.extra["health_check_failures"] == 0
    # The server is gone: its health checks fail.
    deadline = time.monotonic() + 10
    while (await envoy.stats(rev.name)).extra["health_check_failures"] < 2:
        assert time.monotonic() < deadline, "health check failures were not counted"
        await asyncio.sleep(0.1)


async def test_a_second_driver_attaches_and_carries_on_without_touching_traffic(
    envoy: EnvoyProxy, start_inference_server: StartServer
) -> None:
    """A restarted trainer attaches to the running Envoy: the splits it finds are the ones in
    place, re-applying them changes nothing, and it can go on moving weights."""
    async with start_inference_server() as one, start_inference_server() as two:
        champion, challenger = revision("1", one.port), revision("2", two.port)
        both = {champion.name: champion, challenger.name: challenger}
        split = TrafficSplit(CREDIT, {champion.name: 90, challenger.name: 10}, both)
        await envoy.apply(split)
        routes = envoy.layout.rds("public").read_text()

        attached = EnvoyProxy(envoy.settings)
        await attached.attach(timeout=10)
        assert attached.splits == {CREDIT: split}
        assert attached.public_port == envoy.public_port
        await attached.apply(split)
        assert envoy.layout.rds("public").read_text() == routes  # nothing moved
        await attached.apply(TrafficSplit(CREDIT, {champion.name: 0, challenger.name: 100}, both))
        assert attached.splits[CREDIT].weights[challenger.name] == 100
        await attached.wait_healthy(challenger, 10)
        await attached.stop()  # attached: Envoy is not its to stop
        assert await envoy.admin.ready()


async def test_attach_without_a_written_configuration_says_so(tmp_path: Path) -> None:
    proxy = EnvoyProxy(EnvoySettings(work_dir=tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match="no Envoy configuration"):
        await proxy.attach(timeout=1)
