"""The `nomad` orchestrator against a fake Nomad that follows Nomad's HTTP API documentation
(paths, bodies, `X-Nomad-Index` blocking queries, deployment states, plain-text errors), with
real gRPC health servers standing in for the allocations' inference servers."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyclone.nomad.api import DeploymentFailed, NomadClient, NomadError
from cyclone.nomad.dispatch import dispatch_retrain
from cyclone.nomad.validate import parse as parse_hcl
from cyclone.plugins import Plugins, build_plugin_manager
from plugins import orchestrator_nomad
from plugins.orchestrator_nomad import NomadOrchestrator

pytestmark = pytest.mark.integration


class FakeNomad:
    """Jobs, deployments and services in memory; `plan[job]` says how allocations behave:
    "healthy" (default), "unhealthy" (the deployment fails) or "hang" (never healthy)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.jobs: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, str] = {}
        self.services: dict[str, list[dict[str, Any]]] = {}
        self.plan: dict[str, str] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.inject: tuple[int, str] | None = None
        self.delay = 0.0
        self.index = 1
        self.changed = threading.Condition()

    # -- state changes (under self.changed) --
    def _bump(self) -> None:
        self.index += 1
        self.changed.notify_all()

    def _job_json(self, hcl: str) -> dict[str, Any]:
        job = parse_hcl(hcl)
        body = job["body"]
        groups = []
        for entry in body["group"]:
            for name, group in entry.items():
                update = (group.get("update") or [{}])[0]
                groups.append(
                    {
                        "Name": name,
                        "Count": group.get("count", 1),
                        "Update": {
                            "Canary": update.get("canary", 0),
                            "AutoPromote": update.get("auto_promote", False),
                            "AutoRevert": update.get("auto_revert", False),
                            "HealthCheck": update.get("health_check", "checks"),
                        },
                        "Services": [
                            {"Name": s["name"], "PortLabel": s["port"], "Provider": s["provider"]}
                            for s in group.get("service") or []
                        ],
                    }
                )
        meta = (body.get("meta") or [{}])[0]
        return {
            "ID": job["name"],
            "Name": job["name"],
            "Type": body.get("type", "service"),
            "Meta": meta,
            "TaskGroups": groups,
            "ParameterizedJob": (body.get("parameterized") or [None])[0],
        }

    def _register(self, job: dict[str, Any]) -> dict[str, Any]:
        previous = self.jobs.get(job["ID"])
        job = {
            **job,
            "Status": "running",
            "Stop": False,
            "Version": previous["Version"] + 1 if previous else 0,
        }
        self.jobs[job["ID"]] = job
        groups = {}
        for group in job["TaskGroups"]:
            canaries = group["Update"]["Canary"] if previous else 0
            groups[group["Name"]] = {
                "AutoRevert": group["Update"]["AutoRevert"],
                "AutoPromote": group["Update"]["AutoPromote"],
                "Promoted": False,
                "PlacedCanaries": None,
                "DesiredCanaries": canaries,
                "DesiredTotal": group["Count"],
                "PlacedAllocs": 0,
                "HealthyAllocs": 0,
                "UnhealthyAllocs": 0,
            }
        deployment = {
            "ID": str(uuid.uuid4()),
            "JobID": job["ID"],
            "JobVersion": job["Version"],
            "TaskGroups": groups,
            "Status": "running",
            "StatusDescription": "Deployment is running",
        }
        self.deployments[deployment["ID"]] = deployment
        self.latest[job["ID"]] = deployment["ID"]
        self._bump()
        threading.Timer(0.05, self._progress, (deployment["ID"],)).start()
        return {
            "EvalID": str(uuid.uuid4()),
            "EvalCreateIndex": self.index,
            "JobModifyIndex": self.index,
            "Warnings": "",
            "Index": self.index,
        }

    def _progress(self, deployment_id: str) -> None:
        with self.changed:
            deployment = self.deployments[deployment_id]
            job = self.jobs.get(deployment["JobID"])
            if job is None or deployment["Status"] != "running":
                return
            plan = self.plan.get(job["ID"], "healthy")
            if plan == "hang":
                return
            for group in deployment["TaskGroups"].values():
                if plan == "unhealthy":
                    group["PlacedAllocs"], group["UnhealthyAllocs"] = 1, 1
                    deployment["Status"] = "failed"
                    deployment["StatusDescription"] = "Failed due to unhealthy allocations" + (
                        f" - rolling back to job version {max(job['Version'] - 1, 0)}"
                        if group["AutoRevert"]
                        else ""
                    )
                elif group["DesiredCanaries"] and not group["Promoted"]:
                    group["PlacedAllocs"] = group["HealthyAllocs"] = group["DesiredCanaries"]
                    if group["AutoPromote"]:
                        group["Promoted"] = True
                        self._succeed(deployment)
                else:
                    group["PlacedAllocs"] = group["HealthyAllocs"] = group["DesiredTotal"]
                    self._succeed(deployment)
            self._bump()

    def _succeed(self, deployment: dict[str, Any]) -> None:
        deployment["Status"] = "successful"
        deployment["StatusDescription"] = "Deployment completed successfully"
        job = self.jobs[deployment["JobID"]]
        for group in job["TaskGroups"]:
            for service in group["Services"]:
                self.services[service["Name"]] = [
                    {
                        "Address": "127.0.0.1",
                        "Port": port,
                        "ServiceName": service["Name"],
                        "JobID": job["ID"],
                        "AllocID": str(uuid.uuid4()),
                        "Namespace": "default",
                    }
                    for port in self.ports[: group["Count"]]
                ]

    # -- HTTP --
    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        self.calls.append((method, path, body))
        if self.delay:
            time.sleep(self.delay)
        if self.inject is not None:
            status, text = self.inject
            self.inject = None
            return status, text
        parts = path.strip("/").split("/")[1:]  # drop "v1"
        with self.changed:
            if parts == ["jobs", "parse"] and method == "POST":
                if not body or not body.get("JobHCL"):
                    return 400, "Missing JobHCL"
                return 200, self._job_json(body["JobHCL"])
            if parts == ["jobs"] and method == "POST":
                if not body or not body.get("Job") or not body["Job"].get("ID"):
                    return 400, "Job must be specified"
                return 200, self._register(body["Job"])
            if parts == ["jobs"] and method == "GET":
                prefix = query.get("prefix", "")
                return 200, [
                    {
                        "ID": j["ID"],
                        "Status": j["Status"],
                        "Stop": j["Stop"],
                        **({"Meta": j["Meta"]} if query.get("meta") == "true" else {}),
                    }
                    for j in self.jobs.values()
                    if j["ID"].startswith(prefix)
                ]
            if parts[:1] == ["service"] and method == "GET":
                return 200, self.services.get(urllib.parse.unquote(parts[1]), [])
            if parts[:2] in (["deployment", "promote"], ["deployment", "fail"]):
                deployment = self.deployments.get(parts[2])
                if deployment is None:
                    return 404, "deployment not found"
                if deployment["Status"] != "running":
                    return 400, f"can't {parts[1]} terminal deployment"
                if parts[1] == "promote":
                    if body != {"DeploymentID": parts[2], "All": True}:
                        return 400, "bad promote payload"
                    for group in deployment["TaskGroups"].values():
                        group["Promoted"] = True
                    self._succeed(deployment)
                    self._bump()
                    return 200, {"EvalID": str(uuid.uuid4()), "DeploymentModifyIndex": self.index}
                deployment["Status"] = "failed"
                deployment["StatusDescription"] = "Deployment marked as failed - rolling back"
                self._bump()
                return 200, {"EvalID": str(uuid.uuid4()), "RevertedJobVersion": 0}
            if parts[:1] == ["job"]:
                return self._job(method, urllib.parse.unquote(parts[1]), parts[2:], query, body)
        return 404, "Invalid URL path"

    def _job(
        self, method: str, name: str, rest: list[str], query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        job = self.jobs.get(name)
        if job is None:
            return 404, "job not found"
        if rest == [] and method == "GET":
            return 200, job
        if rest == [] and method == "DELETE":
            if query.get("purge") == "true":
                del self.jobs[name]
            else:
                job["Stop"] = True
            for group in job["TaskGroups"]:
                for service in group["Services"]:
                    self.services.pop(service["Name"], None)
            self._bump()
            return 200, {"EvalID": str(uuid.uuid4()), "JobModifyIndex": self.index}
        if rest == ["deployment"] and method == "GET":
            index = int(query.get("index", "0"))
            wait = float(query.get("wait", "0s").rstrip("s") or 0)
            deadline = time.monotonic() + wait
            while index and self.index <= index and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            return 200, self.deployments.get(self.latest.get(name, ""))
        if rest == ["scale"] and method == "POST":
            if not body or "Group" not in (body.get("Target") or {}):
                return 400, "missing task group name"
            current = self.deployments.get(self.latest.get(name, ""))
            if current and current["Status"] == "running":
                return 400, "job scaling blocked due to active deployment"
            for group in job["TaskGroups"]:
                if group["Name"] == body["Target"]["Group"]:
                    group["Count"] = body["Count"]
            self._bump()
            return 200, {"EvalID": str(uuid.uuid4()), "JobModifyIndex": self.index}
        if rest == ["dispatch"] and method == "POST":
            if not job.get("ParameterizedJob"):
                return 400, "Specified job is not a parameterized job"
            return 200, {"DispatchedJobID": f"{name}/dispatch-1-abc", "EvalID": "e"}
        return 405, "Invalid method"


def _serve(fake: FakeNomad) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _do(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = fake.handle(self.command, url.path, query, body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("X-Nomad-Index", str(fake.index))
            self.send_header(
                "Content-Type", "text/plain" if isinstance(payload, str) else "application/json"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _do

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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
    server = _serve(nomad)
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
