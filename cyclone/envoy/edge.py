"""Envoy as the mesh runs it: the data plane's edge, apart from every control-plane process.

`cyclone up` writes the configuration once (`prepare`), runs Envoy as a component of its own
and restarts it at once if it dies: the bootstrap points at the xDS files, so a restarted Envoy
comes back with the last clusters and routes the trainer wrote. The trainer only attaches
(`EnvoyProxy.attach`): writes xDS files, reads the admin API, never starts or stops Envoy.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cyclone.envoy.config import CONTROL, PUBLIC, EnvoySettings, Layout
from cyclone.envoy.proxy import EnvoyProxy
from cyclone.traffic import Endpoint

# How long Envoy holds a request to a revision with no live endpoint (scaled to zero, or its
# only replica crashed) while it starts again: always on, so a crash fails no request.
COLD_START_HOLD_S = 20.0


def _endpoint(address: str) -> Endpoint:
    host, _, port = address.rpartition(":")
    return Endpoint(host or "127.0.0.1", int(port))


def edge_settings(
    data_dir: Path,
    *,
    public_host: str,
    public_port: int,
    control_port: int,
    admin_port: int = 0,
    store: str,
    monitor: str | None,
    trainer: str,
    extra_stores: Sequence[str] = (),
    extra_trainers: Sequence[str] = (),
) -> EnvoySettings:
    """The one description of the mesh's Envoy: the supervisor writes its bootstrap from it and
    the trainer its clusters and routes, so both agree."""
    return EnvoySettings(
        work_dir=data_dir / "envoy",
        public_host=public_host,
        public_port=public_port,
        control_port=control_port,
        admin_port=admin_port,
        store=_endpoint(store),
        extra_stores=tuple(_endpoint(s) for s in extra_stores),
        monitor=_endpoint(monitor) if monitor else None,
        trainer=_endpoint(trainer),
        extra_trainers=tuple(_endpoint(t) for t in extra_trainers),
        cold_start_hold_s=COLD_START_HOLD_S,
    )


def prepare(settings: EnvoySettings) -> None:
    """Write and validate a fresh configuration (no model routed yet)."""
    asyncio.run(EnvoyProxy(settings).write_config())


def command(settings: EnvoySettings) -> list[str]:
    """How to run Envoy on the configuration in `settings.work_dir`."""
    return EnvoyProxy(settings).command()


def admin_address(settings: EnvoySettings) -> str | None:
    try:
        return Layout(settings.work_dir).admin_address.read_text().strip() or None
    except FileNotFoundError:
        return None


def ready(settings: EnvoySettings, timeout: float = 1.0) -> bool:
    """Envoy is live and both listeners are bound (what the mesh waits for)."""
    address = admin_address(settings)
    if address is None:
        return False
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=timeout) as reply:
            if reply.status != 200:
                return False
        with urllib.request.urlopen(
            f"http://{address}/listeners?format=json", timeout=timeout
        ) as reply:
            names = {entry.get("name") for entry in json.load(reply).get("listener_statuses", [])}
    except (OSError, ValueError):
        return False
    return {PUBLIC, CONTROL} <= names
