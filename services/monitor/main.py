"""Builds and runs the monitor server from `MonitorSettings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.plugins import get_plugins
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings
from services.monitor.dispatcher import AlertDispatcher
from services.monitor.monitor import Monitor
from services.monitor.servicer import MonitorServicer

MONITOR_SERVICE = "cyclone.monitor.v1.MonitorService"


@dataclasses.dataclass(frozen=True)
class MonitorSettings(ServerSettings):
    port: int = 8003
    store: str = "127.0.0.1:8002"
    # How often due plans are looked for; each plan has its own schedule.
    tick_seconds: float = 1.0
    alert_interval: float = 1.0
    # Where the `record` sink writes retrain/rollback requests (JSON lines).
    alert_record_path: Path | None = None


def build_monitor_server(
    settings: MonitorSettings, *, schedule: bool = True
) -> tuple[CycloneServer, Monitor]:
    get_plugins()  # load plugins at start-up: a broken plugin set fails here, not mid-evaluation
    record_path = settings.alert_record_path or settings.data_dir / "alerts.jsonl"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(settings.store, record_path=record_path, tick_seconds=settings.tick_seconds)
    server = CycloneServer("monitor", settings)
    server.add_service(
        MONITOR_SERVICE,
        lambda s: pb_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(monitor), s),
    )
    dispatcher_box: list[AlertDispatcher] = []

    async def start() -> None:
        await monitor.start(schedule=schedule)
        dispatcher = AlertDispatcher(monitor.store, interval=settings.alert_interval)
        dispatcher.start()
        dispatcher_box.append(dispatcher)

    async def stop() -> None:
        for dispatcher in dispatcher_box:
            await dispatcher.stop()
        await monitor.stop()

    server.on_start(start)
    server.on_shutdown(stop)
    return server, monitor


async def run_monitor(settings: MonitorSettings) -> None:
    server, _ = build_monitor_server(settings)
    await server.serve_until_signalled()
