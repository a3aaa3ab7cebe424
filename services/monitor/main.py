"""Builds and runs the monitor server from `MonitorSettings`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import grpc

from cyclone.channels import sync_channel
from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.plugins import get_plugins
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings, SettingsError
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor.dashboard import Dashboard, StoreReader
from services.monitor.dispatcher import AlertDispatcher
from services.monitor.monitor import (
    DEFAULT_CONCURRENT_EVALUATIONS,
    DEFAULT_LEASE_SECONDS,
    STORE_CHANNEL_OPTIONS,
    Monitor,
)
from services.monitor.servicer import MonitorServicer

log = logging.getLogger(__name__)

MONITOR_SERVICE = "cyclone.monitor.v1.MonitorService"


@dataclasses.dataclass(frozen=True)
class MonitorSettings(ServerSettings):
    port: int = 8003
    store: str = "127.0.0.1:8002"
    # How often due plans are looked for; each plan has its own schedule.
    tick_seconds: float = 1.0
    # Models evaluated at once (each a window read, plugins, a record); the rest wait their turn.
    max_concurrent_evaluations: int = DEFAULT_CONCURRENT_EVALUATIONS
    # Several monitors share the models through leases in the store: each evaluates only the
    # models it holds. A dead monitor's models move to the others within this many seconds.
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    # This monitor's lease holder id, unique among live monitors; empty: host, pid and a
    # random part (a Nomad job sets it from the allocation id).
    instance_id: str = ""
    alert_interval: float = 1.0
    # How long a claimed alert is this monitor's to deliver; a monitor that dies mid-delivery
    # hands its claimed alerts on after this.
    alert_lease_seconds: int = 60
    # Where the `record` sink writes retrain/rollback requests (JSON lines).
    alert_record_path: Path | None = None
    # Trainer HOST:PORT: retrain and rollback actions go there (`cyclone up` sets it); empty:
    # they are recorded in alert_record_path for whoever acts on them.
    trainer: str = ""
    # Where known-answer probes go when a plan's `probes.address` is empty (the public
    # listener or an inference server, HOST:PORT); empty: no probes for such plans.
    probe_address: str = ""
    # A model that never answered a probe since this monitor started may stay unanswered this
    # long before "no answer" counts (a starting mesh, a route not yet there after an import).
    probe_grace_seconds: float = 60.0
    # Live dashboard (HTTP); 0 picks a free port, -1 turns it off.
    dashboard_port: int = -1
    # Seconds between keep-alive events on the dashboard's event stream.
    dashboard_heartbeat_seconds: float = 15.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_concurrent_evaluations < 1:
            raise SettingsError(
                "max_concurrent_evaluations: must be at least 1,"
                f" got {self.max_concurrent_evaluations}"
            )
        if self.tick_seconds <= 0:
            raise SettingsError(f"tick_seconds: must be positive, got {self.tick_seconds}")
        if self.alert_lease_seconds < 1:
            raise SettingsError(
                f"alert_lease_seconds: must be at least 1, got {self.alert_lease_seconds}"
            )
        # A lease is renewed every tick: it must outlast a few ticks, or a slow tick loses it.
        if self.lease_seconds < 3 * self.tick_seconds:
            raise SettingsError(
                f"lease_seconds: must be at least 3 ticks ({3 * self.tick_seconds:g}s),"
                f" got {self.lease_seconds}"
            )


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
        probe_address=settings.probe_address,
        probe_grace_seconds=settings.probe_grace_seconds,
        max_concurrent_evaluations=settings.max_concurrent_evaluations,
        lease_seconds=settings.lease_seconds,
        holder=settings.instance_id,
    )
    server = CycloneServer("monitor", settings)
    server.add_service(
        MONITOR_SERVICE,
        lambda s: pb_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(monitor), s),
    )
    dispatcher_box: list[AlertDispatcher] = []
    tasks: list[asyncio.Task[None]] = []
    store_channel = (
        sync_channel(settings.store, options=STORE_CHANNEL_OPTIONS)
        if settings.dashboard_port >= 0
        else None
    )
    dashboard = _dashboard(settings, monitor, store_channel) if store_channel else None
    monitor.dashboard = dashboard

    async def start() -> None:
        await monitor.start(schedule=schedule)
        dispatcher = AlertDispatcher(
            monitor.store,
            interval=settings.alert_interval,
            lease_seconds=settings.alert_lease_seconds,
        )
        dispatcher.start()
        dispatcher_box.append(dispatcher)
        if dashboard is not None:
            dashboard.start()
            tasks.append(asyncio.create_task(_push_statuses(monitor, dashboard)))
            log.info("dashboard on http://%s:%d/", settings.host, dashboard.port)

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if dashboard is not None:
            dashboard.stop()
        if store_channel is not None:
            store_channel.close()
        for dispatcher in dispatcher_box:
            await dispatcher.stop()
        await monitor.stop()

    server.on_start(start)
    server.on_shutdown(stop)
    return server, monitor


def _dashboard(settings: MonitorSettings, monitor: Monitor, channel: grpc.Channel) -> Dashboard:
    # The dashboard's threads have their own blocking channel: the monitor's aio channel
    # belongs to the event loop.
    store = store_grpc.StoreServiceStub(channel)
    return Dashboard(
        settings.host,
        settings.dashboard_port,
        StoreReader(store, lambda: monitor.latest("")),
        heartbeat_seconds=settings.dashboard_heartbeat_seconds,
    )


async def _push_statuses(monitor: Monitor, dashboard: Dashboard) -> None:
    """Every evaluation (and so every level change) goes to the open pages as it lands."""
    async for status in monitor.watch(""):
        dashboard.publish_status(status)
