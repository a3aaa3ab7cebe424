"""The `nomad` orchestrator: a model revision as a Nomad service job, driven by Nomad's HTTP API.

`start` renders the revision's job (`cyclone.nomad.render.revision_job`, so it is the same file
`cyclone deploy nomad render` writes), has Nomad parse it (`POST /v1/jobs/parse`), registers it
(`POST /v1/jobs`), watches its deployment with blocking queries (`GET /v1/job/:id/deployment`),
promotes canaries once they are healthy (`POST /v1/deployment/promote/:id`), then discovers the
endpoints (`GET /v1/service/:name`) and, with Nomad's own service provider (which runs no gRPC
checks), checks gRPC health itself. A failed deployment raises `DeploymentFailed` (saying whether
Nomad auto-reverted) and a new job is purged, so nothing is left running. `stop` is
`DELETE /v1/job/:id?purge=true`; `scale` and `fail` are there for operators and the autoscaler.

Config (``create(config)``): ``address`` (http://127.0.0.1:4646), ``token``, ``namespace``,
``image``, ``datacenters`` (list), ``discovery`` (nomad | consul), ``models_volume``,
``deploy_timeout`` (300 s), ``poll_wait`` (5 s, the blocking-query wait), ``grpc_health`` (true),
``health_timeout`` (30 s), ``auto_promote`` (false: this orchestrator promotes).
It matches `services.trainer.rollout.ports.Orchestrator` structurally (plugins never import
services).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyclone.hookspecs import hookimpl
from cyclone.nomad.api import TERMINAL_DEPLOYMENT, DeploymentFailed, NomadClient, NomadError
from cyclone.nomad.hcl import dumps
from cyclone.nomad.render import (
    ClusterSettings,
    RevisionSpec,
    job_id,
    revision_job,
    service_name,
)
from cyclone.plugin_api import OrchestratorSpec
from cyclone.traffic import Endpoint, Revision

log = logging.getLogger(__name__)

GROUP = "inference"
JOB_PREFIX = "cyclone-inference-"


async def _serving(address: str, timeout: float = 1.0) -> bool:
    try:
        async with aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except (grpc.RpcError, OSError):
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class NomadOrchestrator:
    def __init__(self, config: Mapping[str, Any], client: NomadClient | None = None) -> None:
        self.client = client or NomadClient(
            str(config.get("address") or "http://127.0.0.1:4646"),
            token=config.get("token") or None,
            namespace=config.get("namespace") or None,
            timeout=float(config.get("request_timeout", 30.0)),
        )
        defaults = ClusterSettings()
        self.settings = replace(
            defaults,
            image=str(config.get("image") or defaults.image),
            datacenters=tuple(config.get("datacenters") or defaults.datacenters),
            discovery=str(config.get("discovery") or defaults.discovery),
            models_volume=str(config.get("models_volume") or defaults.models_volume),
            auto_promote=bool(config.get("auto_promote", False)),
        )
        self.deploy_timeout = float(config.get("deploy_timeout", 300.0))
        self.poll_wait = float(config.get("poll_wait", 5.0))
        self.grpc_health = bool(config.get("grpc_health", True))
        self.health_timeout = float(config.get("health_timeout", 30.0))

    # ---- the Orchestrator protocol -------------------------------------------------------------

    async def start(self, model: str, version: str, replicas: int) -> Revision:
        job = job_id(model, version)
        existing = await self.client.read(job)
        if existing is not None and not existing.get("Stop") and existing.get("Status") != "dead":
            return await self._revision(model, version)  # already running: a no-op
        spec = RevisionSpec(model, version, "serving", max(replicas, 1))
        parsed = await self.client.parse(job, dumps(revision_job(spec, self.settings)))
        await self.client.register(parsed)
        log.info("nomad job %s registered (%d replicas)", job, spec.replicas)
        try:
            await self.wait_deployed(job)
            revision = await self._revision(model, version, wait_for=spec.replicas)
        except BaseException:
            if existing is None:  # a job we created: leave nothing running
                await self._purge_quietly(job)
            raise
        log.info(
            "revision %s serving on %s", revision.name, [e.address for e in revision.endpoints]
        )
        return revision

    async def stop(self, revision_name: str) -> None:
        job = JOB_PREFIX + revision_name
        try:
            await self.client.deregister(job, purge=True)
        except NomadError as exc:
            if exc.status != 404:  # unknown names are a no-op
                raise

    async def running(self) -> Sequence[Revision]:
        revisions = []
        for stub in await self.client.jobs(JOB_PREFIX):
            meta = stub.get("Meta") or {}
            if stub.get("Stop") or stub.get("Status") == "dead" or "cyclone_model" not in meta:
                continue
            revisions.append(await self._revision(meta["cyclone_model"], meta["cyclone_version"]))
        return revisions

    # ---- Nomad operations ----------------------------------------------------------------------

    async def wait_deployed(self, job: str) -> dict[str, Any]:
        """Follow the job's latest deployment to a terminal state; promote healthy canaries.

        Raises `DeploymentFailed` when it fails (auto_revert is reported) and `TimeoutError`
        naming the job when it has not finished within `deploy_timeout`.
        """
        deadline = time.monotonic() + self.deploy_timeout
        index = 0
        promoted: set[str] = set()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"nomad job {job!r}: deployment not finished after {self.deploy_timeout:g} s"
                )
            deployment, index = await self.client.latest_deployment(
                job, index, wait=min(self.poll_wait, remaining)
            )
            if deployment is None:
                await asyncio.sleep(min(0.2, remaining))  # the scheduler has not made one yet
                continue
            status = deployment.get("Status")
            if status == "successful":
                return deployment
            if status in TERMINAL_DEPLOYMENT:
                raise DeploymentFailed(job, deployment)
            deployment_id = str(deployment["ID"])
            if deployment_id not in promoted and _canaries_healthy(deployment):
                await self.client.promote(job, deployment_id)
                promoted.add(deployment_id)
                log.info(
                    "nomad job %s: canaries healthy, deployment %s promoted", job, deployment_id
                )

    async def fail(self, revision: str) -> dict[str, Any]:
        """Mark the revision's running deployment failed (Nomad reverts when auto_revert)."""
        job = JOB_PREFIX + revision
        deployment, _ = await self.client.latest_deployment(job)
        if deployment is None or deployment.get("Status") in TERMINAL_DEPLOYMENT:
            raise NomadError(job, "POST", "/v1/deployment/fail", None, "no running deployment")
        return await self.client.fail(job, str(deployment["ID"]))

    async def scale(self, revision: str, count: int, message: str = "cyclone") -> None:
        if count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        await self.client.scale(JOB_PREFIX + revision, GROUP, count, message)

    async def close(self) -> None:
        """Nothing to release: revisions belong to the cluster, not to this process."""

    # ---- internals -----------------------------------------------------------------------------

    async def _revision(self, model: str, version: str, wait_for: int = 0) -> Revision:
        job, name = job_id(model, version), service_name(model, version)
        deadline = time.monotonic() + self.health_timeout
        while True:
            instances = await self.client.service(job, name)
            endpoints = tuple(
                sorted(
                    {Endpoint(str(i["Address"]), int(i["Port"])) for i in instances},
                    key=lambda e: (e.host, e.port),
                )
            )
            ready = len(endpoints) >= wait_for and (
                not (self.grpc_health and wait_for)
                or all([await _serving(e.address) for e in endpoints])
            )
            if ready:
                return Revision(model, version, endpoints)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nomad job {job!r}: service {name!r} has {len(endpoints)} of {wait_for}"
                    f" endpoints answering gRPC health after {self.health_timeout:g} s"
                )
            await asyncio.sleep(0.2)

    async def _purge_quietly(self, job: str) -> None:
        try:
            await self.client.deregister(job, purge=True)
        except NomadError as exc:
            log.warning("cannot purge %s after a failed start: %s", job, exc)


def _canaries_healthy(deployment: Mapping[str, Any]) -> bool:
    groups = (deployment.get("TaskGroups") or {}).values()
    waiting = [g for g in groups if g.get("DesiredCanaries") and not g.get("Promoted")]
    return bool(waiting) and all(
        int(g.get("HealthyAllocs") or 0) >= int(g["DesiredCanaries"]) for g in waiting
    )


def _create(config: Mapping[str, Any]) -> NomadOrchestrator:
    return NomadOrchestrator(config)


@hookimpl
def cyclone_register_orchestrators(register: Callable[[OrchestratorSpec], None]) -> None:
    register(
        OrchestratorSpec(
            "nomad",
            _create,
            "Model revisions as Nomad service jobs (canary deployments, auto-revert)",
        )
    )
