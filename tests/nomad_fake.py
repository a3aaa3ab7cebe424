"""A fake Nomad that follows Nomad's HTTP API documentation (paths, bodies, `X-Nomad-Index`
blocking queries, deployment states, plain-text errors), for the Nomad orchestrator and the
trainer's Nomad job executor. `serve(fake)` runs it on a free loopback port."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cyclone.nomad.validate import parse as parse_hcl


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
        # What a dispatch starts (Nomad would place the batch job's task): called with the
        # dispatched job id, the payload and the meta, under the lock, before the reply.
        self.on_dispatch: Callable[[str, bytes, dict[str, str]], None] | None = None
        self.dispatches = 0

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

    def finish(self, job: str) -> None:
        """A batch job's task is over: the job is dead (Nomad keeps it till garbage collection)."""
        with self.changed:
            self.jobs[job]["Status"] = "dead"
            self._bump()

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
            self.dispatches += 1
            dispatched = f"{name}/dispatch-{self.dispatches}-abc"
            # The dispatched child job; `finish(dispatched)` when its task is over.
            self.jobs[dispatched] = {
                "ID": dispatched,
                "ParentID": name,
                "Type": "batch",
                "Status": "running",
                "Stop": False,
                "Meta": dict((body or {}).get("Meta") or {}),
                "TaskGroups": [],
                "ParameterizedJob": None,
                "Dispatched": True,
            }
            if self.on_dispatch is not None:
                payload = base64.b64decode((body or {}).get("Payload") or "")
                self.on_dispatch(dispatched, payload, dict((body or {}).get("Meta") or {}))
            return 200, {"DispatchedJobID": dispatched, "EvalID": "e"}
        return 405, "Invalid method"


def serve(fake: FakeNomad) -> ThreadingHTTPServer:
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
