"""Builds and runs the monitor server from `MonitorSettings`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cyclone.channels import sync_channel
from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.plugins import get_plugins
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor import convert
from services.monitor.dashboard import Dashboard
from services.monitor.dispatcher import AlertDispatcher
from services.monitor.monitor import Monitor
from services.monitor.records import ModelStatus, QueuedAlert
from services.monitor.servicer import MonitorServicer

log = logging.getLogger(__name__)

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
    # Trainer HOST:PORT: retrain and rollback actions go there (`cyclone up` sets it); empty:
    # they are recorded in alert_record_path for whoever acts on them.
    trainer: str = ""
    # Live dashboard (HTTP); 0 picks a free port, -1 turns it off.
    dashboard_port: int = -1


def build_monitor_server(
    settings: MonitorSettings, *, schedule: bool = True
) -> tuple[CycloneServer, Monitor]:
    get_plugins()  # load plugins at start-up: a broken plugin set fails here, not mid-evaluation
    record_path = settings.alert_record_path or settings.data_dir / "alerts.jsonl"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(
        settings.store,
        record_path=record_path,
        trainer=settings.trainer,
        tick_seconds=settings.tick_seconds,
    )
    server = CycloneServer("monitor", settings)
    server.add_service(
        MONITOR_SERVICE,
        lambda s: pb_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(monitor), s),
    )
    dispatcher_box: list[AlertDispatcher] = []
    dashboard = _dashboard(settings, monitor) if settings.dashboard_port >= 0 else None
    monitor.dashboard = dashboard

    async def start() -> None:
        await monitor.start(schedule=schedule)
        dispatcher = AlertDispatcher(monitor.store, interval=settings.alert_interval)
        dispatcher.start()
        dispatcher_box.append(dispatcher)
        if dashboard is not None:
            dashboard.start()
            log.info("dashboard on http://%s:%d/", settings.host, dashboard.port)

    async def stop() -> None:
        if dashboard is not None:
            dashboard.stop()
        for dispatcher in dispatcher_box:
            await dispatcher.stop()
        await monitor.stop()

    server.on_start(start)
    server.on_shutdown(stop)
    return server, monitor


def _dashboard(settings: MonitorSettings, monitor: Monitor) -> Dashboard:
    # The dashboard thread has its own blocking channel: the monitor's aio channel
    # belongs to the event loop.
    channel = sync_channel(settings.store)
    store = store_grpc.StoreServiceStub(channel)

    def alerts() -> list[QueuedAlert]:
        response = store.ListAlerts(store_pb.ListAlertsRequest(limit=50), timeout=5)
        return [convert.alert_from_store(a) for a in response.alerts]

    def statuses() -> list[ModelStatus]:
        return monitor.latest("")

    return Dashboard(settings.host, settings.dashboard_port, statuses, alerts)


async def run_monitor(settings: MonitorSettings) -> None:
    server, _ = build_monitor_server(settings)
    await server.serve_until_signalled()
