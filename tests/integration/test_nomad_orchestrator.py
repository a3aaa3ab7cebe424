"""The `nomad` orchestrator against a fake Nomad (tests/nomad_fake.py) that follows Nomad's HTTP
API documentation (paths, bodies, `X-Nomad-Index` blocking queries, deployment states, plain-text
errors), with real gRPC health servers standing in for the allocations' inference servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nomad_fake import FakeNomad, serve

from cyclone.nomad.api import DeploymentFailed, NomadClient, NomadError
from cyclone.nomad.dispatch import dispatch_retrain
from cyclone.plugins import Plugins, build_plugin_manager
from plugins import orchestrator_nomad
from plugins.orchestrator_nomad import NomadOrchestrator

pytestmark = pytest.mark.integration


@pytest.fixture
async def health_ports() -> AsyncIterator[list[int]]:
    servers, ports = [], []
    for _ in range(2):
        server = aio.server()
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    yield ports
    for server in servers:
        await server.stop(None)


@pytest.fixture
def fake(health_ports: list[int]) -> Iterator[FakeNomad]:
    nomad = FakeNomad(health_ports)
    server = serve(nomad)
    nomad.address = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield nomad
    server.shutdown()
    server.server_close()


def _orchestrator(fake: FakeNomad, **config: Any) -> NomadOrchestrator:
    return NomadOrchestrator(
        {
            "address": fake.address,
            "poll_wait": 1,
            "deploy_timeout": 5,  # type: ignore[attr-defined]
            "health_timeout": 3,
            **config,
        }
    )


def test_registered_as_a_plugin() -> None:
    plugins = Plugins(
        build_plugin_manager(load_entrypoints=False, extra_plugins=[orchestrator_nomad])
    )
    orchestrator = plugins.orchestrators["nomad"].create({"address": "http://127.0.0.1:1"})
    assert isinstance(orchestrator, NomadOrchestrator)


async def test_start_running_scale_stop(fake: FakeNomad, health_ports: list[int]) -> None:
    orch = _orchestrator(fake)
    revision = await orch.start("credit", "3", replicas=2)
    assert revision.name == "credit--3"
    assert sorted(e.port for e in revision.endpoints) == sorted(health_ports)
    paths = [(m, p) for m, p, _ in fake.calls]
    assert ("POST", "/v1/jobs/parse") in paths and ("POST", "/v1/jobs") in paths
    [register] = [b for m, p, b in fake.calls if p == "/v1/jobs" and m == "POST"]
    group = register["Job"]["TaskGroups"][0]
    assert group["Update"] == {
        "Canary": 1,
        "AutoPromote": False,
        "AutoRevert": True,
        "HealthCheck": "checks",
    }
    assert group["Count"] == 2 and group["Services"][0]["Name"] == "cyclone-credit-v3"
    assert any(p == "/v1/job/cyclone-inference-credit--3/deployment" for _, p, _ in fake.calls)

    # Starting what runs is a no-op: no second registration.
    again = await orch.start("credit", "3", replicas=2)
    assert again == revision
    assert sum(1 for m, p, _ in fake.calls if (m, p) == ("POST", "/v1/jobs")) == 1
    assert [r.name for r in await orch.running()] == ["credit--3"]

    await orch.scale("credit--3", 1, "quiet hours")
    [scale] = [b for m, p, b in fake.calls if p.endswith("/scale")]
    assert scale == {"Count": 1, "Target": {"Group": "inference"}, "Message": "quiet hours"}
    assert fake.jobs["cyclone-inference-credit--3"]["TaskGroups"][0]["Count"] == 1

    await orch.stop("credit--3")
    assert ("DELETE", "/v1/job/cyclone-inference-credit--3") in [(m, p) for m, p, _ in fake.calls]
    assert await orch.running() == []
    await orch.stop("credit--3")  # unknown names are a no-op


async def test_canaries_are_promoted_once_healthy(fake: FakeNomad) -> None:
    orch = _orchestrator(fake)
    await orch.start("credit", "3", replicas=2)
    job = "cyclone-inference-credit--3"
    # An in-place update (new image, resources): Nomad places a canary first.
    await orch.client.register(fake.jobs[job] | {"Meta": {**fake.jobs[job]["Meta"], "x": "1"}})
    deployment = await orch.wait_deployed(job)
    assert deployment["Status"] == "successful"
    assert deployment["TaskGroups"]["inference"]["Promoted"] is True
    assert [p for _, p, _ in fake.calls if "/promote/" in p] == [
        f"/v1/deployment/promote/{deployment['ID']}"
    ]


async def test_fail_a_running_deployment(fake: FakeNomad) -> None:
    orch = _orchestrator(fake)
    await orch.start("credit", "3", replicas=1)
    job = "cyclone-inference-credit--3"
    fake.plan[job] = "hang"
    await orch.client.register(fake.jobs[job])
    reply = await orch.fail("credit--3")
    assert reply["RevertedJobVersion"] == 0
    with pytest.raises(DeploymentFailed, match="marked as failed"):
        await orch.wait_deployed(job)
    with pytest.raises(NomadError, match="no running deployment"):
        await orch.fail("credit--3")


async def test_failed_deployment_reports_auto_revert_and_leaves_nothing(fake: FakeNomad) -> None:
    orch = _orchestrator(fake)
    fake.plan["cyclone-inference-credit--4"] = "unhealthy"
    with pytest.raises(DeploymentFailed) as caught:
        await orch.start("credit", "4", replicas=1)
    assert caught.value.reverted and caught.value.auto_revert
    assert "cyclone-inference-credit--4" in str(caught.value)
    assert "auto_revert" in str(caught.value)
    assert "cyclone-inference-credit--4" not in fake.jobs  # purged


async def test_deployment_that_never_finishes_times_out_naming_the_job(fake: FakeNomad) -> None:
    orch = _orchestrator(fake, deploy_timeout=1.5)
    fake.plan["cyclone-inference-credit--5"] = "hang"
    with pytest.raises(TimeoutError, match="cyclone-inference-credit--5"):
        await orch.start("credit", "5", replicas=1)
    assert "cyclone-inference-credit--5" not in fake.jobs


async def test_error_responses_name_the_job(fake: FakeNomad) -> None:
    orch = _orchestrator(fake)
    fake.inject = (500, "rpc error: No cluster leader")
    with pytest.raises(
        NomadError, match=r"cyclone-inference-credit--6.*HTTP 500.*No cluster leader"
    ):
        await orch.start("credit", "6", replicas=1)
    await orch.start("credit", "6", replicas=1)
    with pytest.raises(NomadError, match=r"HTTP 400.*blocked due to active deployment") as caught:
        fake.plan["cyclone-inference-credit--6"] = "hang"
        await orch.client.register(fake.jobs["cyclone-inference-credit--6"])
        await orch.scale("credit--6", 3)
    assert caught.value.status == 400 and caught.value.job == "cyclone-inference-credit--6"
    with pytest.raises(ValueError, match="count"):
        await orch.scale("credit--6", -1)


async def test_timeouts_and_unreachable_nomad_name_the_job(fake: FakeNomad) -> None:
    fake.delay = 0.5
    slow = NomadOrchestrator({"address": fake.address, "request_timeout": 0.1})  # type: ignore[attr-defined]
    with pytest.raises(NomadError, match=r"cyclone-inference-credit--7.*no answer"):
        await slow.start("credit", "7", replicas=1)
    fake.delay = 0
    gone = NomadOrchestrator({"address": "http://127.0.0.1:9", "request_timeout": 1})
    with pytest.raises(NomadError, match=r"cyclone-inference-credit--7.*no answer"):
        await gone.start("credit", "7", replicas=1)


async def test_dispatch_retraining_with_the_job_id_as_payload(fake: FakeNomad) -> None:
    from cyclone.nomad.hcl import dumps
    from cyclone.nomad.render import ClusterSettings, retrain_job

    client = NomadClient(fake.address)  # type: ignore[attr-defined]
    job = await client.parse("cyclone-retrain", dumps(retrain_job(ClusterSettings())))
    await client.register(job)
    dispatched = await dispatch_retrain(client, 42, model="credit")
    assert dispatched.startswith("cyclone-retrain/dispatch-")
    [body] = [b for _, p, b in fake.calls if p.endswith("/dispatch")]
    assert body == {"Payload": "NDI=", "Meta": {"model": "credit"}}  # base64("42")
    with pytest.raises(ValueError, match="training_job_id"):
        await dispatch_retrain(client, 0)
    await client.register({"ID": "plain", "TaskGroups": [], "Meta": {}})
    with pytest.raises(NomadError, match=r"'plain'.*not a parameterized job"):
        await dispatch_retrain(client, 1, job="plain")


async def test_endpoints_not_answering_grpc_health_fail_the_start(fake: FakeNomad) -> None:
    fake.ports = [fake.ports[0], 9]  # the second allocation's server does not answer
    orch = _orchestrator(fake, health_timeout=1)
    with pytest.raises(TimeoutError, match=r"cyclone-inference-credit--8.*gRPC health"):
        await orch.start("credit", "8", replicas=2)
    assert "cyclone-inference-credit--8" not in fake.jobs
