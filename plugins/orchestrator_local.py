"""The `local` orchestrator: a model revision as N supervised inference subprocesses.

Each replica is `python -m cyclone_app serve inference --model-repository R --model M --version V
--port P [--store S]` on a port chosen once (a restarted replica keeps it, so the proxy's
endpoints stay valid; `start(..., ports=...)` brings a stopped revision back on its old ports). `start` returns once every replica answers gRPC health with SERVING; a
replica that dies is restarted with exponential backoff; `stop` sends SIGTERM and kills after a
grace period. One log file per revision under `<data_dir>/revisions/`.

With ``detached`` (as under `cyclone up`) the replicas outlive the orchestrator: `close` leaves
them running, their ports and pids are kept in `<data_dir>/revisions/running.json`, and `adopt`
in the next orchestrator (a restarted trainer) supervises them again -- a dead one is restarted
on its port -- so serving never waits for the control plane.

A replica that exits is restarted at once the first time (Envoy holds its requests meanwhile),
then with exponential backoff if it keeps exiting.

With ``pool_processes`` > 0 small models share a serving pool: that many inference processes
(`--pool-memory-mb`: each loads model versions on their first request and evicts the least
recently used past its budget), started with the first pooled revision and supervised like a
revision's replicas (adopted the same way when detached). A version whose `model.onnx` is at
most ``pool_threshold_mb`` is pooled: its Revision's endpoints are the pool's processes
(``pooled``: Envoy's cluster names the version in request headers), its start loads nothing
(the member Envoy sends it to loads it on its first request; ``pool_warm`` loads it in every
member at once) and its stop leaves it to their LRU; bigger ones get dedicated replicas.

Config (``create(config)``): ``model_repository`` (required), ``store`` (HOST:PORT, optional),
``data_dir`` (default ``~/.cyclone``), ``host`` (127.0.0.1), ``grace_seconds`` (10),
``start_timeout`` (60), ``python`` (this interpreter), ``extra_args`` (list of strings),
``detached`` (False), ``pool_processes`` (0: no pool), ``pool_memory_mb`` (1024, per process),
``pool_threshold_mb`` (64), ``pool_warm`` (False).
The methods are async and revisions are named by `cyclone.traffic.revision_name`, so a Nomad
orchestrator can offer the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
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
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyclone.channels import aio_channel
from cyclone.hookspecs import hookimpl
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc
from cyclone.plugin_api import OrchestratorSpec
from cyclone.traffic import Endpoint, Revision, revision_name

log = logging.getLogger(__name__)

MAX_BACKOFF = 10.0
# The serving pool's processes, kept under this name in `running.json` and the logs.
POOL_NAME = "cyclone-pool"
POOL_MEMORY_MB = 1024.0
POOL_THRESHOLD_MB = 64.0
MIB = 1 << 20
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
    # A replica a previous orchestrator started (detached): watched by pid, not waited on.
    adopted_pid: int | None = None

    @property
    def pid(self) -> int | None:
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return self.adopted_pid


def _is_replica(pid: int, revision: Revision, port: int) -> bool:
    """`pid` is alive and is the inference server of `revision` (or a pool member) on `port`
    (not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        argv = process.cmdline()
    except psutil.Error:
        return False
    wanted = [("--port", str(port))]
    if not _is_pool(revision):
        wanted += [("--model", revision.model), ("--version", revision.version)]
    elif "--pool-memory-mb" not in argv:
        return False
    pairs = set(itertools.pairwise(argv))
    return "inference" in argv and all(pair in pairs for pair in wanted)


def _is_pool(revision: Revision) -> bool:
    return revision.pooled and revision.model == POOL_NAME


def _pool_revision(endpoints: tuple[Endpoint, ...]) -> Revision:
    """The pool's processes, supervised as the replicas of a pseudo-revision."""
    return Revision(POOL_NAME, "", endpoints, pooled=True)


def _positive(config: Mapping[str, Any], key: str, default: float) -> float:
    value = float(config.get(key, default))
    if not value > 0:
        raise ValueError(f"{key}: must be more than 0, got {value:g}")
    return value


async def _wait_exit(pid: int, poll: float = 0.1) -> None:
    """Until a process that is not our child exits (a pidfd where the kernel has them)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            await asyncio.sleep(poll)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


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
        self.detached = bool(config.get("detached", False))
        self.pool_processes = int(config.get("pool_processes", 0))
        if self.pool_processes < 0:
            raise ValueError(
                f"pool_processes: must be 0 (no pool) or more, got {self.pool_processes}"
            )
        self.pool_memory_mb = _positive(config, "pool_memory_mb", POOL_MEMORY_MB)
        self.pool_threshold_mb = _positive(config, "pool_threshold_mb", POOL_THRESHOLD_MB)
        # Load a pooled version in every member at start. Off by default: Envoy sends a model
        # to one member (by hash), so warming all of them fills the others' budgets with
        # versions they never serve; the first request waits for the load instead.
        self.pool_warm = bool(config.get("pool_warm", False))
        self._revisions: dict[str, _Running] = {}
        # Pooled revisions (model versions served by the pool) and the pool's own processes.
        self._pooled: dict[str, Revision] = {}
        self._pool: _Running | None = None
        self._lock = asyncio.Lock()

    def log_path(self, name: str) -> Path:
        return self.data_dir / "revisions" / f"{name}.log"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "revisions" / "running.json"

    def _save_state(self) -> None:
        """Which revisions run where, for the next orchestrator to adopt (detached only)."""
        if not self.detached:
            return
        processes = [*self._revisions.values(), *([self._pool] if self._pool else [])]
        state: dict[str, Any] = {
            (POOL_NAME if r is self._pool else r.revision.name): {
                "model": r.revision.model,
                "version": r.revision.version,
                "ports": [replica.port for replica in r.replicas],
                "pids": [replica.pid for replica in r.replicas],
                **({"pool": True} if r is self._pool else {}),
            }
            for r in processes
        }
        for name, revision in self._pooled.items():
            state[name] = {"model": revision.model, "version": revision.version, "pooled": True}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.state_path)

    async def adopt(self) -> list[Revision]:
        """Supervise again the revisions a previous orchestrator left running (detached): a
        replica still alive is watched where it is, a dead one restarted on its port. Returns
        the revisions adopted; `running()` lists them from now on."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)
            return []
        adopted = []
        pooled = {n: e for n, e in state.items() if isinstance(e, dict) and e.get("pooled")}
        pool_entry = state.get(POOL_NAME)
        for name, entry in sorted(state.items()):
            if name in pooled:
                continue
            try:
                ports = [int(p) for p in entry["ports"]]
                pids = [int(p) if p else None for p in entry["pids"]]
                endpoints = tuple(Endpoint(self.host, p) for p in ports)
                revision = (
                    _pool_revision(endpoints)
                    if name == POOL_NAME
                    else Revision(str(entry["model"]), str(entry["version"]), endpoints)
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("cannot adopt %s from %s: %s", name, self.state_path, exc)
                continue
            async with self._lock:
                if name in self._revisions or (name == POOL_NAME and self._pool is not None):
                    continue
                replicas = [
                    _Replica(
                        port, adopted_pid=pid if pid and _is_replica(pid, revision, port) else None
                    )
                    for port, pid in zip(ports, pids, strict=False)
                ]
                path = self.log_path(revision.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                running = _Running(revision, replicas, path.open("ab"))
                if name == POOL_NAME:
                    self._pool = running
                else:
                    self._revisions[name] = running
                self._supervise_all(running, name)
            alive = sum(r.adopted_pid is not None for r in replicas)
            log.info(
                "adopted revision %s: %d of %d replica(s) still running", name, alive, len(replicas)
            )
            if name != POOL_NAME:
                adopted.append(revision)
        if pooled and self._pool is None:
            log.warning("%d pooled revision(s) but no pool in %s", len(pooled), self.state_path)
        elif pool_entry is not None and self._pool is not None:
            for name, entry in sorted(pooled.items()):
                revision = self._pooled_revision(str(entry["model"]), str(entry["version"]))
                self._pooled[name] = revision
                adopted.append(revision)
        self._save_state()
        return adopted

    async def start(
        self, model: str, version: str, replicas: int, *, ports: Sequence[int] | None = None
    ) -> Revision:
        """Start the revision; `ports` (one per replica) restarts a stopped revision where it
        was, so the proxy's endpoints for it stay valid (scale to zero, then wake). A small
        model's version is served by the pool instead (`pooled`)."""
        name = revision_name(model, version)
        if self.pools(model, version):
            return await self._start_pooled(model, version)
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
            self._supervise_all(running, name)
        try:
            await self._wait_serving(running)
        except BaseException:
            await self.stop(name)
            raise
        self._save_state()
        log.info("revision %s serving on %s", name, [e.address for e in revision.endpoints])
        return revision

    def pools(self, model: str, version: str) -> bool:
        """Whether this version is served by the pool: pool on, and its ONNX file no bigger
        than `pool_threshold_mb` (a version missing from the repository: no)."""
        if self.pool_processes <= 0:
            return False
        onnx = self.model_repository / model / version / "model.onnx"
        try:
            size = onnx.stat().st_size
        except OSError:
            return False
        return size <= self.pool_threshold_mb * MIB

    def _pooled_revision(self, model: str, version: str) -> Revision:
        assert self._pool is not None
        return Revision(model, version, self._pool.revision.endpoints, pooled=True)

    async def _start_pooled(self, model: str, version: str) -> Revision:
        pool = await self._start_pool()
        revision = Revision(model, version, pool.revision.endpoints, pooled=True)
        async with self._lock:
            self._pooled[revision.name] = revision
        if self.pool_warm:
            await self._warm(revision)
        self._save_state()
        log.info(
            "revision %s served by the pool on %s",
            revision.name,
            [e.address for e in revision.endpoints],
        )
        return revision

    async def _start_pool(self) -> _Running:
        """The pool's processes, started (and seen serving) once."""
        async with self._lock:
            pool = self._pool
            if pool is None:
                ports = [_free_port(self.host) for _ in range(self.pool_processes)]
                endpoints = tuple(Endpoint(self.host, p) for p in ports)
                path = self.log_path(POOL_NAME)
                path.parent.mkdir(parents=True, exist_ok=True)
                pool = _Running(
                    _pool_revision(endpoints), [_Replica(p) for p in ports], path.open("ab")
                )
                self._pool = pool
                self._supervise_all(pool, POOL_NAME)
        try:
            await self._wait_serving(pool)
        except BaseException:
            async with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.stopping = True
            await asyncio.gather(*(self._terminate(r) for r in pool.replicas))
            await self._cancel_supervisors(pool)
            raise
        self._save_state()
        return pool

    async def _warm(self, revision: Revision) -> None:
        """Load the version in every pool member before traffic reaches it (best effort: a
        member that misses it loads it on its first request)."""
        request = oip_pb.RepositoryModelLoadRequest(model_name=revision.model)
        request.parameters["version"].string_param = revision.version
        for endpoint in revision.endpoints:
            try:
                async with aio_channel(endpoint.address) as channel:
                    await oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                        request, timeout=self.start_timeout
                    )
            except grpc.RpcError as exc:
                log.warning(
                    "revision %s: warming it on %s failed (%s); it loads on its first request",
                    revision.name,
                    endpoint.address,
                    exc.details(),
                )

    async def stop(self, revision_name: str) -> None:
        async with self._lock:
            if self._pooled.pop(revision_name, None) is not None:
                # The shared processes stay; the members' LRU evicts the version once unused.
                self._save_state()
                return
            running = self._revisions.pop(revision_name, None)
        if running is None:
            return
        running.stopping = True
        await asyncio.gather(*(self._terminate(r) for r in running.replicas))
        await self._cancel_supervisors(running)
        self._save_state()

    async def _cancel_supervisors(self, running: _Running) -> None:
        for task in running.supervisors:
            task.cancel()
        for task in running.supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running.log.close()

    async def running(self) -> Sequence[Revision]:
        return [*(r.revision for r in self._revisions.values()), *self._pooled.values()]

    async def close(self) -> None:
        """The orchestrator's owner shuts down: stop every revision, or when detached leave
        them serving (the next orchestrator adopts them)."""
        if self.detached:
            async with self._lock:
                revisions, self._revisions = self._revisions, {}
                pool, self._pool = self._pool, None
                self._pooled = {}
            for running in [*revisions.values(), *([pool] if pool else [])]:
                running.stopping = True  # only the supervision ends
                await self._cancel_supervisors(running)
            return
        for name in list(self._revisions):
            await self.stop(name)
        async with self._lock:
            pool, self._pool = self._pool, None
            self._pooled = {}
        if pool is not None:
            pool.stopping = True
            await asyncio.gather(*(self._terminate(r) for r in pool.replicas))
            await self._cancel_supervisors(pool)

    def replica_pids(self, revision_name: str) -> list[int]:
        """The processes serving a revision (a pooled one's: the pool's)."""
        running = self._revisions.get(revision_name)
        if running is None and (revision_name in self._pooled or revision_name == POOL_NAME):
            running = self._pool
        if running is None:
            return []
        return [pid for pid in (r.pid for r in running.replicas) if pid is not None]

    # ---- internals -------------------------------------------------------------------------

    def _command(self, revision: Revision, port: int) -> list[str]:
        serves = (
            ["--pool-memory-mb", f"{self.pool_memory_mb:g}"]
            if _is_pool(revision)
            else ["--model", revision.model, "--version", revision.version]
        )
        cmd = [
            self.python,
            "-m",
            "cyclone_app",
            "serve",
            "inference",
            "--model-repository",
            str(self.model_repository),
            *serves,
            "--host",
            self.host,
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            # Its spool and journal live in this data dir, not in whatever the environment or
            # ~/.cyclone says: another mesh's replica on the same port would replay them.
            "--data-dir",
            str(self.data_dir),
        ]
        if self.store:
            cmd += ["--store", self.store]
        return cmd + self.extra_args

    def _supervise_all(self, running: _Running, name: str) -> None:
        """Start a supervisor task for each of `running`'s replicas."""
        running.supervisors.extend(
            asyncio.create_task(self._supervise(running, replica), name=f"{name}:{replica.port}")
            for replica in running.replicas
        )

    async def _supervise(self, running: _Running, replica: _Replica) -> None:
        """Run one replica; restart it whenever it exits: at once the first time (a crash of
        the only replica: Envoy holds its requests meanwhile), then with exponential backoff."""
        backoff = 0.0
        if replica.adopted_pid is not None:
            await _wait_exit(replica.adopted_pid)
            replica.adopted_pid = None
            if running.stopping:
                return
            log.warning(
                "revision %s replica :%d (adopted) exited; restarting",
                running.revision.name,
                replica.port,
            )
        while not running.stopping:
            started = time.monotonic()
            replica.process = await asyncio.create_subprocess_exec(
                *self._command(running.revision, replica.port),
                stdout=running.log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # our signals reach it only when we send them
            )
            self._save_state()
            code = await replica.process.wait()
            if running.stopping:
                return
            if time.monotonic() - started > 30:
                backoff = 0.0  # it ran fine for a while: restart at once
            replica.restarts += 1
            log.warning(
                "revision %s replica :%d exited with %s; restarting in %.1f s",
                running.revision.name,
                replica.port,
                code,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.5), MAX_BACKOFF)

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
        if replica.adopted_pid is not None:
            await self._terminate_adopted(replica.adopted_pid)
            return
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

    async def _terminate_adopted(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(_wait_exit(pid), self.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


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
