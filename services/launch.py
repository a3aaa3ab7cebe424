"""The one launcher: every Cyclone service starts here, in this process or as a subprocess.

In-process, each service has one shape, `await start_<service>(settings) -> Started`: the server
is listening and its background work (prediction logging, plan scheduling, alert delivery) is
running when it returns; `await started.stop()` undoes all of it. The CLI's `serve`, the demo,
`cyclone up`, the benchmarks and the tests all start services through this module.

As a subprocess, `spawn(component, args)` runs `python -m cyclone_app serve <component>` on a free
port and returns once the process answers gRPC health with SERVING.

This is the composition root: it may import every service's package; the services themselves
never import each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyclone import heap
from cyclone.server import CycloneServer

log = logging.getLogger(__name__)

D = TypeVar("D")


@dataclasses.dataclass
class Started(Generic[D]):
    """A running in-process service: its server and its domain object (scorer, db, monitor)."""

    component: str
    server: CycloneServer
    domain: D

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        host = self.server.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{self.port}"

    async def stop(self, grace: float | None = 0) -> None:
        """Stop taking calls, finish in-flight ones within `grace` s, run shutdown hooks."""
        await self.server.stop(grace)

    async def __aenter__(self) -> Started[D]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_store(settings: Any) -> Started[Any]:
    """Store on `settings.database_url`, or an embedded PostgreSQL under `settings.data_dir`."""
    from services.store.main import build_store_server

    server = await build_store_server(settings)
    await server.start()
    return Started("store", server, getattr(server, "db", None))


async def start_inference(settings: Any, sink: Any = None) -> Started[Any]:
    """Inference server; logs every prediction to `settings.store` when it is set.

    `sink` replaces the store sink (tests use it to capture predictions).
    """
    from services.inference.main import attach_store, build_inference_server

    server, scorer = build_inference_server(settings, sink)
    if settings.store and sink is None:
        attach_store(settings, server, scorer)
    if not scorer.catalog.models and not scorer.catalog.pooled:
        # Keep running: a model can still be loaded through the repository API.
        log.warning("no model loaded from %s; OIP ServerReady is false", settings.model_repository)
    await server.start()
    return Started("inference", server, scorer)


async def start_monitor(settings: Any, *, schedule: bool = True) -> Started[Any]:
    """Monitor: plan scheduling (unless `schedule` is False), alert delivery, dashboard."""
    from services.monitor.main import build_monitor_server

    server, monitor = build_monitor_server(settings, schedule=schedule)
    await server.start()
    return Started("monitor", server, monitor)


async def start_trainer(settings: Any) -> Started[Any]:
    """Trainer: retraining jobs (worker processes); with `envoy`, Envoy, revisions, rollouts."""
    from services.trainer.main import build_trainer_server

    server, trainer = build_trainer_server(settings)
    await server.start()
    return Started("trainer", server, trainer)


def settings_class(component: str) -> type[Any]:
    """The typed settings class of a service (`cyclone serve <component>` builds one)."""
    if component == "store":
        from services.store.main import StoreSettings

        return StoreSettings
    if component == "inference":
        from services.inference.main import InferenceSettings

        return InferenceSettings
    if component == "monitor":
        from services.monitor.main import MonitorSettings

        return MonitorSettings
    if component == "trainer":
        from services.trainer.main import TrainerSettings

        return TrainerSettings
    raise ValueError(f"component: unknown service {component!r}")


STARTERS: dict[str, Callable[[Any], Awaitable[Started[Any]]]] = {
    "store": start_store,
    "inference": start_inference,
    "monitor": start_monitor,
    "trainer": start_trainer,
}


def run(component: str, settings: Any) -> None:
    """`serve` on the event loop the settings name (asyncio's own where uvloop is missing)."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("%s: uvloop is not installed; running on asyncio's event loop", component)
        else:
            uvloop.run(serve(component, settings))
            return
    asyncio.run(serve(component, settings))


async def serve(component: str, settings: Any) -> None:
    """Start one service and run it until SIGTERM or SIGINT, then stop it gracefully."""
    if component == "trainer" and getattr(settings, "run_job_file", None) is not None:
        from services.trainer.main import run_one_job

        raise SystemExit(await run_one_job(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    heap.tune()
    started = await STARTERS[component](settings)
    # Start-up is done: what it made lives as long as the process, out of every collection.
    # (Process-wide, so here and not in the server: a test process starts hundreds of them.)
    heap.settle()
    try:
        await stop.wait()
        log.info("%s: shutting down", component)
    finally:
        await started.stop(None)


# ---- subprocesses -------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Spawned:
    """A service running as `python -m cyclone_app serve <component>` in its own process."""

    component: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: health NOT_SERVING, in-flight calls finish), SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def __enter__(self) -> Spawned:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn(
    component: str,
    args: list[str],
    log_path: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    new_session: bool = False,
) -> Spawned:
    """Run `cyclone serve <component> <args> --port PORT` and wait until it is SERVING.

    `port` None picks a free one. Output goes to `log_path`. `new_session` puts the process in
    a process group of its own (a supervisor can then stop it and every child it started). Raises RuntimeError with the log's
    tail when the process exits or is not healthy within `timeout` seconds.
    """
    port = free_port() if port is None else port
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cyclone_app", "serve", component, *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=new_session,
        )
    spawned = Spawned(component, f"127.0.0.1:{port}", process, log_path)
    try:
        wait_serving(spawned.address, timeout, process=process, log_path=log_path)
    except BaseException:
        spawned.stop(5)
        raise
    return spawned


def wait_serving(
    address: str,
    timeout: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until `address` answers gRPC health SERVING (overall, service "")."""

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:] if log_path else ""

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{address} exited ({process.returncode}); log:\n{tail()}")
            with contextlib.suppress(grpc.RpcError):
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} not healthy after {timeout:.0f}s; log:\n{tail()}")
            time.sleep(0.1)
