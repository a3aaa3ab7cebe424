"""A small async client for the parts of Nomad's HTTP API Cyclone uses.

Paths and bodies follow Nomad's API documentation (`/v1/jobs`, `/v1/job/:id/...`,
`/v1/deployment/...`, `/v1/service/:name`). Requests run in a thread (`urllib`, no extra
dependency). Every failure (4xx/5xx, timeout, refused connection) raises `NomadError` naming the
job, the method and path, and Nomad's answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

TERMINAL_DEPLOYMENT = ("successful", "failed", "cancelled")


class NomadError(Exception):
    """Nomad refused or did not answer a request about `job`."""

    def __init__(self, job: str, method: str, path: str, status: int | None, detail: str) -> None:
        self.job, self.method, self.path, self.status, self.detail = (
            job,
            method,
            path,
            status,
            detail,
        )
        what = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"nomad job {job!r}: {method} {path}: {what}: {detail.strip()[:500]}")


class DeploymentFailed(NomadError):
    """A job's deployment ended failed or cancelled; `reverted` when Nomad auto-reverted it."""

    def __init__(self, job: str, deployment: dict[str, Any]) -> None:
        self.deployment = deployment
        groups = deployment.get("TaskGroups") or {}
        self.auto_revert = any(bool(g.get("AutoRevert")) for g in groups.values())
        description = str(deployment.get("StatusDescription") or "")
        self.reverted = self.auto_revert or "rolling back" in description.lower()
        detail = f"deployment {deployment.get('ID')} {deployment.get('Status')}: {description}"
        if self.reverted:
            detail += " (auto_revert: Nomad rolls the job back to its last stable version)"
        super().__init__(job, "GET", f"/v1/job/{job}/deployment", 200, detail)


@dataclass(frozen=True)
class Response:
    body: Any
    index: int  # X-Nomad-Index (0 when absent)


class NomadClient:
    def __init__(
        self,
        address: str = "http://127.0.0.1:4646",
        *,
        token: str | None = None,
        namespace: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.timeout = timeout

    # ---- transport -----------------------------------------------------------------------------

    def _call(
        self,
        job: str,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        params = dict(query or {})
        if self.namespace:
            params.setdefault("namespace", self.namespace)
        url = self.address + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("X-Nomad-Token", self.token)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as reply:
                raw = reply.read()
                index = int(reply.headers.get("X-Nomad-Index") or 0)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace") or exc.reason
            raise NomadError(job, method, path, exc.code, str(detail)) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NomadError(job, method, path, None, f"{type(exc).__name__}: {reason}") from None
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise NomadError(job, method, path, 200, f"not JSON: {raw[:200]!r}") from None
        return Response(parsed, index)

    async def request(self, job: str, method: str, path: str, **kwargs: Any) -> Response:
        return await asyncio.to_thread(self._call, job, method, path, **kwargs)

    # ---- jobs ----------------------------------------------------------------------------------

    async def parse(self, job: str, hcl: str) -> dict[str, Any]:
        """HCL -> the JSON job (`POST /v1/jobs/parse`)."""
        reply = await self.request(
            job, "POST", "/v1/jobs/parse", body={"JobHCL": hcl, "Canonicalize": True}
        )
        return dict(reply.body)

    async def register(self, job: dict[str, Any]) -> dict[str, Any]:
        reply = await self.request(str(job.get("ID")), "POST", "/v1/jobs", body={"Job": job})
        return dict(reply.body or {})

    async def read(self, job: str) -> dict[str, Any] | None:
        """The job, or None when Nomad does not know it."""
        try:
            reply = await self.request(job, "GET", f"/v1/job/{_quote(job)}")
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(reply.body)

    async def jobs(self, prefix: str) -> list[dict[str, Any]]:
        reply = await self.request(
            prefix + "*", "GET", "/v1/jobs", query={"prefix": prefix, "meta": "true"}
        )
        return list(reply.body or [])

    async def deregister(self, job: str, purge: bool = True) -> None:
        await self.request(
            job, "DELETE", f"/v1/job/{_quote(job)}", query={"purge": str(purge).lower()}
        )

    async def scale(self, job: str, group: str, count: int, message: str) -> dict[str, Any]:
        body = {"Count": count, "Target": {"Group": group}, "Message": message}
        reply = await self.request(job, "POST", f"/v1/job/{_quote(job)}/scale", body=body)
        return dict(reply.body or {})

    async def dispatch(
        self, job: str, payload: bytes, meta: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"Payload": base64.b64encode(payload).decode()}
        if meta:
            body["Meta"] = meta
        reply = await self.request(job, "POST", f"/v1/job/{_quote(job)}/dispatch", body=body)
        return dict(reply.body or {})

    # ---- deployments ---------------------------------------------------------------------------

    async def latest_deployment(
        self, job: str, index: int = 0, wait: float = 5.0
    ) -> tuple[dict[str, Any] | None, int]:
        """The job's most recent deployment (None before the scheduler made one) and the
        index to pass next: a blocking query returns when it changes or after `wait`."""
        query = {"index": str(index), "wait": f"{max(wait, 0.0):g}s"} if index else None
        reply = await self.request(
            job,
            "GET",
            f"/v1/job/{_quote(job)}/deployment",
            query=query,
            timeout=self.timeout + wait,
        )
        return (dict(reply.body) if reply.body else None), reply.index

    async def promote(self, job: str, deployment_id: str) -> dict[str, Any]:
        reply = await self.request(
            job,
            "POST",
            f"/v1/deployment/promote/{deployment_id}",
            body={"DeploymentID": deployment_id, "All": True},
        )
        return dict(reply.body or {})

    async def fail(self, job: str, deployment_id: str) -> dict[str, Any]:
        reply = await self.request(job, "POST", f"/v1/deployment/fail/{deployment_id}")
        return dict(reply.body or {})

    # ---- services ------------------------------------------------------------------------------

    async def service(self, job: str, name: str) -> list[dict[str, Any]]:
        reply = await self.request(job, "GET", f"/v1/service/{_quote(name)}")
        return list(reply.body or [])


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")
