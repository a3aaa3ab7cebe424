"""Reading Envoy's admin interface (loopback HTTP): clusters, health, config versions, stats."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

# Health flags Envoy reports on a host that must not receive traffic.
_UNHEALTHY_FLAGS = (
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_eds_health",
    "pending_active_hc",
    "pending_dynamic_removal",
    "active_hc_timeout",
)


@dataclass(frozen=True)
class HostHealth:
    address: str
    healthy: bool
    flags: tuple[str, ...]


class EnvoyAdmin:
    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout

    def _get(self, path: str) -> bytes:
        url = f"http://{self.address}{path}"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            body: bytes = response.read()
            return body

    async def get_json(self, path: str) -> Any:
        return json.loads(await asyncio.to_thread(self._get, path))

    async def ready(self) -> bool:
        try:
            await asyncio.to_thread(self._get, "/ready")
        except (OSError, urllib.error.URLError):
            return False
        return True

    async def listener_ports(self) -> dict[str, int]:
        """Listener name -> bound port (how port 0 is read back)."""
        body = await self.get_json("/listeners?format=json")
        ports: dict[str, int] = {}
        for item in body.get("listener_statuses", []):
            socket = item.get("local_address", {}).get("socket_address", {})
            if "port_value" in socket:
                ports[item["name"]] = int(socket["port_value"])
        return ports

    async def clusters(self) -> dict[str, list[HostHealth]]:
        """Active clusters (warming ones are not listed) and the health of their hosts."""
        body = await self.get_json("/clusters?format=json")
        found: dict[str, list[HostHealth]] = {}
        for cluster in body.get("cluster_statuses", []):
            hosts = []
            for host in cluster.get("host_statuses", []):
                socket = host.get("address", {}).get("socket_address", {})
                health = host.get("health_status", {})
                flags = tuple(f for f in _UNHEALTHY_FLAGS if health.get(f))
                status = health.get("eds_health_status", "HEALTHY")
                healthy = not flags and status in ("HEALTHY", "UNKNOWN")
                hosts.append(
                    HostHealth(
                        f"{socket.get('address')}:{socket.get('port_value')}", healthy, flags
                    )
                )
            found[cluster["name"]] = hosts
        return found

    async def route_versions(self) -> dict[str, str]:
        """Dynamic route table name -> the version_info Envoy installed."""
        # Only the names and versions: whole tables of hundreds of models are megabytes.
        body = await self.get_json(
            "/config_dump?resource=dynamic_route_configs&mask=version_info,route_config.name"
        )
        versions: dict[str, str] = {}
        for item in body.get("configs", []):
            name = item.get("route_config", {}).get("name")
            if name:
                versions[name] = str(item.get("version_info", ""))
        return versions

    async def stats(
        self, prefix: str, *, window: str = "cumulative"
    ) -> tuple[dict[str, int], dict[str, dict[float, float]]]:
        """Counters/gauges and histogram quantiles whose names start with `prefix`.

        `window`: "cumulative" (since the stat was created) or "interval" (the last stats
        flush interval only: the same recent period for every cluster)."""
        from urllib.parse import quote

        body = await self.get_json(f"/stats?format=json&filter={quote('^' + _escape(prefix))}")
        values: dict[str, int] = {}
        quantiles: dict[str, dict[float, float]] = {}
        for stat in body.get("stats", []):
            if "name" in stat and "value" in stat:
                values[stat["name"]] = int(stat["value"])
            histograms = stat.get("histograms")
            if isinstance(histograms, dict):
                supported = [float(q) for q in histograms.get("supported_quantiles", [])]
                for item in histograms.get("computed_quantiles", []):
                    chosen = [v.get(window) for v in item.get("values", [])]
                    quantiles[item["name"]] = {
                        q: float(v)
                        for q, v in zip(supported, chosen, strict=False)
                        if v is not None
                    }
        return values, quantiles


def _escape(text: str) -> str:
    import re

    return re.escape(text)
