"""The `local` orchestrator: a model revision as N supervised inference subprocesses.

Each replica is `python -m cyclone serve inference --model-repository R --model M --version V
--port P [--store S]` on a port chosen once (a restarted replica keeps it, so the proxy's
endpoints stay valid; `start(..., ports=...)` brings a stopped revision back on its old ports). `start` returns once every replica answers gRPC health with SERVING; a
replica that dies is restarted with exponential backoff; `stop` sends SIGTERM and kills after a
grace period. One log file per revision under `<data_dir>/revisions/`.

Config (``create(config)``): ``model_repository`` (required), ``store`` (HOST:PORT, optional),
``data_dir`` (default ``~/.cyclone``), ``host`` (127.0.0.1), ``grace_seconds`` (10),
``start_timeout`` (60), ``python`` (this interpreter), ``extra_args`` (list of strings).
The methods are async and revisions are named by `cyclone.traffic.revision_name`, so a Nomad
orchestrator can offer the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyclone.channels import aio_channel
from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import OrchestratorSpec
from cyclone.traffic import Endpoint, Revision, revision_name

log = logging.getLogger(__name__)

MAX_BACKOFF = 10.0
# A replica that exits this many times before it ever served will not come up (bad flags, a
# broken model): `start` gives up at once instead of waiting out `start_timeout`.
EXITS_BEFORE_SERVING = 3


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _serving(address: str, timeout: float = 1.0) -> bool:
    try:
        async with aio_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except (grpc.RpcError, OSError):
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class _Replica:
    port: int
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


@dataclass
class _Running:
    revision: Revision
    replicas: list[_Replica]
    log: IO[bytes]
    supervisors: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False


class LocalOrchestrator:
    def __init__(self, config: Mapping[str, Any]) -> None:
        if not config.get("model_repository"):
            raise ValueError("model_repository: required by the local orchestrator")
        self.model_repository = Path(str(config["model_repository"]))
        self.store = str(config.get("store") or "")
        self.data_dir = Path(str(config.get("data_dir") or Path.home() / ".cyclone"))
        self.host = str(config.get("host", "127.0.0.1"))
        self.grace = float(config.get("grace_seconds", 10.0))
        self.start_timeout = float(config.get("start_timeout", 60.0))
        self.python = str(config.get("python") or sys.executable)
        self.extra_args = [str(a) for a in config.get("extra_args", [])]
        self._revisions: dict[str, _Running] = {}
        self._lock = asyncio.Lock()

    def log_path(self, name: str) -> Path:
        return self.data_dir / "revisions" / f"{name}.log"

    async def start(
        self, model: str, version: str, replicas: int, *, ports: Sequence[int] | None = None
    ) -> Revision:
        """Start the revision; `ports` (one per replica) restarts a stopped revision where it
        was, so the proxy's endpoints for it stay valid (scale to zero, then wake)."""
        name = revision_name(model, version)
        async with self._lock:
            if name in self._revisions:
                return self._revisions[name].revision
            path = self.log_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if ports is not None and not ports:
                raise ValueError("ports: give one port per replica, got none")
            ports = list(ports or [_free_port(self.host) for _ in range(max(replicas, 1))])
            revision = Revision(model, version, tuple(Endpoint(self.host, p) for p in ports))
            running = _Running(revision, [_Replica(p) for p in ports], path.open("ab"))
            self._revisions[name] = running
            for replica in running.replicas:
                running.supervisors.append(
                    asyncio.create_task(
                        self._supervise(running, replica), name=f"{name}:{replica.port}"
                    )
                )
        try:
            await self._wait_serving(running)
        except BaseException:
            await self.stop(name)
            raise
        log.info("revision %s serving on %s", name, [e.address for e in revision.endpoints])
        return revision

    async def stop(self, revision_name: str) -> None:
        async with self._lock:
            running = self._revisions.pop(revision_name, None)
        if running is None:
            return
        running.stopping = True
        await asyncio.gather(*(self._terminate(r) for r in running.replicas))
        for task in running.supervisors:
            task.cancel()
        for task in running.supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running.log.close()

    async def running(self) -> Sequence[Revision]:
        return [r.revision for r in self._revisions.values()]

    async def close(self) -> None:
        """Stop every revision (the orchestrator's owner shuts down)."""
        for name in list(self._revisions):
            await self.stop(name)

    def replica_pids(self, revision_name: str) -> list[int]:
        running = self._revisions.get(revision_name)
        if running is None:
            return []
        return [
            r.process.pid for r in running.replicas if r.process and r.process.returncode is None
        ]

    # ---- internals -------------------------------------------------------------------------

    def _command(self, revision: Revision, port: int) -> list[str]:
        cmd = [
            self.python,
            "-m",
            "cyclone",
            "serve",
            "inference",
            "--model-repository",
            str(self.model_repository),
            "--model",
            revision.model,
            "--version",
            revision.version,
            "--host",
            self.host,
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ]
        if self.store:
            cmd += ["--store", self.store]
        return cmd + self.extra_args

    async def _supervise(self, running: _Running, replica: _Replica) -> None:
        """Run one replica; restart it with exponential backoff whenever it exits."""
        backoff = 0.5
        while not running.stopping:
            started = time.monotonic()
            replica.process = await asyncio.create_subprocess_exec(
                *self._command(running.revision, replica.port),
                stdout=running.log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # our signals reach it only when we send them
            )
            code = await replica.process.wait()
            if running.stopping:
                return
            if time.monotonic() - started > 30:
                backoff = 0.5  # it ran fine for a while: restart promptly
            replica.restarts += 1
            log.warning(
                "revision %s replica :%d exited with %s; restarting in %.1f s",
                running.revision.name,
                replica.port,
                code,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _wait_serving(self, running: _Running) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = {e.address for e in running.revision.endpoints}
        while pending:
            for address in list(pending):
                if await _serving(address):
                    pending.discard(address)
            if not pending:
                return
            crashing = [r for r in running.replicas if r.restarts >= EXITS_BEFORE_SERVING]
            if crashing:
                raise RuntimeError(
                    f"revision {running.revision.name}: replica :{crashing[0].port} exited"
                    f" {crashing[0].restarts} times before serving; log:"
                    f" {self.log_path(running.revision.name)}\n{self._log_tail(running)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"revision {running.revision.name}: {sorted(pending)} not serving after"
                    f" {self.start_timeout:g} s (log: {self.log_path(running.revision.name)})"
                )
            await asyncio.sleep(0.2)

    def _log_tail(self, running: _Running, lines: int = 5) -> str:
        running.log.flush()
        text = self.log_path(running.revision.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def _terminate(self, replica: _Replica) -> None:
        process = replica.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def _create(config: Mapping[str, Any]) -> LocalOrchestrator:
    return LocalOrchestrator(config)


@hookimpl
def cyclone_register_orchestrators(register: Callable[[OrchestratorSpec], None]) -> None:
    register(
        OrchestratorSpec(
            "local",
            _create,
            "Model revisions as supervised inference subprocesses on this machine",
        )
    )
