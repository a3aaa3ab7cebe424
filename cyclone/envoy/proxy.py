"""The Envoy control plane: runs one Envoy process and drives it through file-based xDS.

Implements `cyclone.traffic.TrafficRouter`. A split is applied in a safe order: the new clusters
are added (CDS) and Envoy is seen to have them, then the routes change (RDS), and clusters that
left the split are removed only after the new routes are installed and they have drained. Every
configuration passes `envoy --mode validate` (and a check that every route names a known cluster)
before it is written; a rejected one leaves Envoy as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import yaml
from google.protobuf import descriptor_pb2

from cyclone.envoy import config as cfg
from cyclone.envoy.admin import EnvoyAdmin
from cyclone.envoy.files import EnvoyConfigError, dump, envoy_binary, validate, write_atomically
from cyclone.errors import NotLeader
from cyclone.traffic import Endpoint, Revision, RevisionStats, TrafficSplit

log = logging.getLogger(__name__)

_POLL_S = 0.05
# The bootstrap's stats_flush_interval: what histogram "interval" quantiles cover.
_STATS_FLUSH_S = 1.0
# gRPC statuses that are the caller's fault, not the revision's (see RevisionStats.failures).
_CALLER_STATUSES = {"0", "3", "5"}
# cluster.<name>.grpc.<package.Service>.<Method>.<status code>
_GRPC_STATUS = re.compile(r"\.grpc\..+\.[^.]+\.(\d+)$")


def descriptor_services(path: Any) -> set[str]:
    """Fully qualified names of the services in a descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return {f"{f.package}.{s.name}" if f.package else s.name for f in fds.file for s in f.service}


def _named_clusters(routes: Mapping[str, Any]) -> set[str]:
    """Every cluster a route table sends to (or mirrors to)."""
    names: set[str] = set()
    for host in routes["virtual_hosts"]:
        for route in host["routes"]:
            action = route.get("route")
            if not action:
                continue
            if "cluster" in action:
                names.add(action["cluster"])
            for weighted in action.get("weighted_clusters", {}).get("clusters", []):
                names.add(weighted["name"])
            for mirror in action.get("request_mirror_policies", []):
                names.add(mirror["cluster"])
    return names


def check_references(clusters: Sequence[Mapping[str, Any]], routes: Mapping[str, Any]) -> None:
    """Envoy's validate mode does not check that routes name existing clusters; we do."""
    known = {c["name"] for c in clusters}
    wanted = set().union(*(_named_clusters(t) for t in routes.values()))
    for cluster in clusters:
        typed = cluster.get("cluster_type", {}).get("typed_config", {})
        wanted.update(typed.get("clusters", []))
    missing = sorted(wanted - known)
    if missing:
        raise EnvoyConfigError(f"routes name clusters that are not configured: {missing}")


def save_splits(path: Any, splits: Mapping[str, TrafficSplit]) -> None:
    document = {
        model: {
            "weights": dict(split.weights),
            "revisions": {
                name: {
                    "model": r.model,
                    "version": r.version,
                    "endpoints": [[e.host, e.port] for e in r.endpoints],
                    "pooled": r.pooled,
                }
                for name, r in split.revisions.items()
            },
            "shadow": split.shadow,
            "shadow_percent": split.shadow_percent,
        }
        for model, split in splits.items()
    }
    write_atomically(path, json.dumps(document, indent=1, sort_keys=True))


async def _write_yaml(path: Any, document: Mapping[str, Any]) -> None:
    """Off the event loop: the YAML of every cluster and its fsync take a trainer's loop ~0.1 s
    with a few models and grow with each (every write is under `EnvoyProxy._lock`)."""
    await asyncio.to_thread(lambda: write_atomically(path, dump(document)))


def load_splits(path: Any) -> dict[str, TrafficSplit]:
    """The saved splits; none when the file is missing or unreadable (the driver re-applies)."""
    try:
        document = json.loads(path.read_text())
        return {
            model: TrafficSplit(
                model,
                {name: int(w) for name, w in body["weights"].items()},
                {
                    name: Revision(
                        r["model"],
                        r["version"],
                        tuple(Endpoint(h, int(p)) for h, p in r["endpoints"]),
                        bool(r.get("pooled", False)),
                    )
                    for name, r in body["revisions"].items()
                },
                body.get("shadow"),
                float(body.get("shadow_percent", 100.0)),
            )
            for model, body in document.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


async def _always() -> bool:
    return True


class EnvoyProxy:
    """One Envoy process in front of Cyclone; `async with EnvoyProxy(settings) as proxy:`."""

    def __init__(
        self,
        settings: cfg.EnvoySettings,
        *,
        may_write: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        # Fencing: asked before every xDS write; False (a trainer whose leadership ended)
        # refuses the write with NotLeader, so a deposed leader never drives Envoy.
        self.may_write = may_write or _always
        self.layout = cfg.Layout(settings.work_dir)
        self._services = descriptor_services(settings.descriptor)
        self._splits: dict[str, TrafficSplit] = {}
        self._installed_clusters: list[dict[str, Any]] = []
        self._installed_routes: dict[str, Any] = {}
        self._version = 0
        self._lock = asyncio.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: EnvoyAdmin | None = None
        # Envoy runs apart (attach): its admin address is re-read, as it moves on a restart.
        self._attached = False
        self._ports: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def admin(self) -> EnvoyAdmin:
        if self._attached:
            address = self._read_admin_address()
            if address and (self._admin is None or self._admin.address != address):
                self._admin = EnvoyAdmin(address)
        if self._admin is None:
            raise RuntimeError("envoy is not running: call start() first")
        return self._admin

    @property
    def public_port(self) -> int:
        return self._ports[cfg.PUBLIC]

    @property
    def control_port(self) -> int:
        return self._ports[cfg.CONTROL]

    @property
    def public_address(self) -> str:
        host = (
            "127.0.0.1"
            if self.settings.public_host in ("0.0.0.0", "::")
            else self.settings.public_host
        )
        return f"{host}:{self.public_port}"

    @property
    def control_address(self) -> str:
        return f"{self.settings.control_host}:{self.control_port}"

    @property
    def splits(self) -> Mapping[str, TrafficSplit]:
        return dict(self._splits)

    async def write_config(self) -> None:
        """Write and validate the bootstrap, the listeners and the initial clusters and routes
        (the components only, plus any split applied before start). Whoever runs Envoy calls
        it once; an Envoy restarted on the same files comes back with the last config."""
        await self._check_may_write()
        layout = self.layout
        layout.xds_dir.mkdir(parents=True, exist_ok=True)
        clusters = cfg.component_clusters(self.settings)
        routes = self._route_tables(self._splits)
        await self._validate(clusters, routes)
        self._version += 1
        version = str(self._version)
        write_atomically(layout.cds, dump(cfg.cds_response(version, clusters)))
        for table, body in routes.items():
            write_atomically(layout.rds(table), dump(cfg.rds_response(version, body)))
        self._installed_routes = dict(routes)
        self._installed_clusters = clusters
        save_splits(layout.splits, self._splits)
        listeners = cfg.listeners(self.settings, self._services, cfg.rds_sources(layout))
        write_atomically(layout.lds, dump(cfg.lds_response(version, listeners)))
        bootstrap = cfg.bootstrap(self.settings, layout)
        await validate(bootstrap, layout.work_dir)
        write_atomically(layout.bootstrap, dump(bootstrap))

    def command(self) -> list[str]:
        """How Envoy is run on the written bootstrap (by this proxy, or by a supervisor)."""
        layout = self.layout
        command = [
            str(envoy_binary()),
            "-c",
            str(layout.bootstrap),
            "--disable-hot-restart",  # several Envoys may share a machine (tests, agents)
            "--admin-address-path",
            str(layout.admin_address),
            "--log-level",
            self.settings.log_level,
            "--drain-time-s",
            "2",
        ]
        if self.settings.concurrency:
            command += ["--concurrency", str(self.settings.concurrency)]
        return command

    async def start(self, timeout: float = 30.0) -> None:
        """Write and validate the initial config, start Envoy, wait until both listeners are up."""
        await self.write_config()
        self.layout.admin_address.unlink(missing_ok=True)
        with self.layout.log.open("ab") as log_file:
            self._process = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            await self._wait_started(timeout)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "envoy listening: public %s, control %s", self.public_address, self.control_address
        )

    async def attach(self, timeout: float = 30.0) -> None:
        """Drive an Envoy that runs apart (`cyclone up` supervises it): wait until it is up,
        then carry on from the clusters, routes and splits it has. Never starts or stops it,
        so a restarted trainer changes nothing in flight."""
        # In a thread: parsing the xDS files' YAML holds the loop ~0.1 s per attach.
        if not await asyncio.to_thread(self._load_installed):
            raise RuntimeError(
                f"no Envoy configuration under {self.layout.work_dir}: whoever runs Envoy"
                " writes it first (EnvoyProxy.write_config)"
            )
        self._attached = True
        await self._wait_started(timeout)
        log.info(
            "attached to envoy: public %s, control %s, %d model(s) routed",
            self.public_address,
            self.control_address,
            len(self._splits),
        )

    def _load_installed(self) -> bool:
        """Read back what the xDS files say is installed (and the splits behind it)."""
        layout = self.layout
        try:
            cds = yaml.safe_load(layout.cds.read_text())
            tables = {t: yaml.safe_load(layout.rds(t).read_text()) for t in cfg.ROUTE_TABLES}
        except (FileNotFoundError, yaml.YAMLError):
            return False

        def strip(resource: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in resource.items() if k != "@type"}

        self._installed_clusters = [strip(c) for c in cds["resources"]]
        self._installed_routes = {t: strip(body["resources"][0]) for t, body in tables.items()}
        versions = [cds["version_info"], *(body["version_info"] for body in tables.values())]
        self._version = max(self._version, *(int(v) for v in versions))
        self._splits = load_splits(layout.splits)
        return True

    async def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"envoy exited at start:\n{self.log_tail()}")
            address = self._read_admin_address()
            if address:
                self._admin = EnvoyAdmin(address)
                if await self._admin.ready():
                    ports = await self._admin.listener_ports()
                    if {cfg.PUBLIC, cfg.CONTROL} <= ports.keys():
                        self._ports = ports
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(_POLL_S)

    def _read_admin_address(self) -> str | None:
        try:
            text = self.layout.admin_address.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.layout.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no envoy log)"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def stop(self, timeout: float = 10.0) -> None:
        """Terminate Envoy and wait for it; no process is left behind."""
        process, self._process = self._process, None
        self._admin = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def __aenter__(self) -> EnvoyProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- TrafficRouter -----------------------------------------------------------------------

    async def apply(self, split: TrafficSplit) -> None:
        """Install `split`: clusters first, then routes, then drop clusters that left it."""
        async with self._lock:
            await self._install({**self._splits, split.model: split})

    async def apply_all(self, splits: Sequence[TrafficSplit]) -> None:
        """Install several models' splits as one config (one validation, one file write): what
        serving hundreds of models at once needs, where `apply` per model costs a validation
        of the whole config each."""
        async with self._lock:
            await self._install({**self._splits, **{split.model: split for split in splits}})

    async def remove_model(self, model: str) -> None:
        async with self._lock:
            if model in self._splits:
                await self._install({m: s for m, s in self._splits.items() if m != model})

    async def wait_healthy(self, revision: Revision, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wanted = {e.address for e in revision.endpoints}
        problems = "cluster not configured in envoy"
        while True:
            hosts = (await self.admin.clusters()).get(revision.name)
            if hosts is not None:
                by_address = {h.address: h for h in hosts}
                bad = [
                    f"{a} ({', '.join(by_address[a].flags) or 'unhealthy'})"
                    if a in by_address
                    else f"{a} (not known to envoy)"
                    for a in sorted(wanted)
                    if a not in by_address or not by_address[a].healthy
                ]
                if not bad:
                    return
                problems = "; ".join(bad)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"revision {revision.name}: not healthy after {timeout:g}s: {problems}"
                )
            await asyncio.sleep(_POLL_S * 4)

    async def stats(self, revision_name: str) -> RevisionStats:
        """Requests, failures and latency of one revision, as Envoy saw them.

        `requests` and connect failures are counted at the revision's own cluster (its hosts);
        gRPC statuses and latency where the router charges them: the revision's failover
        cluster for routed traffic, the revision cluster itself for mirrored (shadow) traffic.
        """
        own = f"cluster.{revision_name}."
        routed = f"cluster.{cfg.failover_name(revision_name)}."
        values, quantiles = await self.admin.stats(f"cluster.{revision_name}")
        values = {k: v for k, v in values.items() if k.startswith((own, routed))}
        if not values:
            return RevisionStats()

        def total(name: str) -> int:
            return values.get(own + name, 0) + values.get(routed + name, 0)

        grpc_failures = 0
        for name, value in values.items():
            found = _GRPC_STATUS.search(name)
            if found and found.group(1) not in _CALLER_STATUSES:
                grpc_failures += value
        connect_failures = values.get(own + "upstream_cx_connect_fail", 0)
        latency = quantiles.get(routed + "upstream_rq_time") or quantiles.get(
            own + "upstream_rq_time", {}
        )
        # The last flush interval: the same recent period for every revision, so a canary's
        # cold start or a busy moment of the machine does not weigh on it alone.
        _, recent_quantiles = await self.admin.stats(f"cluster.{revision_name}", window="interval")
        recent = recent_quantiles.get(routed + "upstream_rq_time") or recent_quantiles.get(
            own + "upstream_rq_time", {}
        )
        requests = values.get(own + "upstream_rq_total", 0)
        return RevisionStats(
            requests=requests,
            failures=total("upstream_rq_5xx") + grpc_failures + connect_failures,
            latency_ms_p50=latency.get(50.0),
            latency_ms_p99=latency.get(99.0),
            extra={
                "upstream_rq_5xx": float(total("upstream_rq_5xx")),
                "grpc_failures": float(grpc_failures),
                "connect_failures": float(connect_failures),
                "retries": float(total("upstream_rq_retry")),
                "ejections": float(
                    values.get(own + "outlier_detection.ejections_enforced_total", 0)
                ),
                "health_check_failures": float(values.get(own + "health_check.failure", 0)),
                # Seconds covered by latency_ms_p99_recent (the bootstrap's stats flush
                # interval); the p99 itself is absent when the window had no calls.
                "recent_window_s": _STATS_FLUSH_S,
                **({"latency_ms_p99_recent": recent[99.0]} if 99.0 in recent else {}),
                "active": float(values.get(own + "upstream_rq_active", 0)),
            },
        )

    # --- installing configuration ------------------------------------------------------------

    def _route_tables(self, splits: Mapping[str, TrafficSplit]) -> dict[str, dict[str, Any]]:
        return {
            cfg.PUBLIC: cfg.public_routes(splits, self.settings),
            cfg.CONTROL: cfg.control_routes(splits, self.settings),
        }

    def _clusters(self, splits: Mapping[str, TrafficSplit]) -> list[dict[str, Any]]:
        clusters = cfg.component_clusters(self.settings)
        for model in sorted(splits):
            clusters += cfg.split_clusters(splits[model], self.settings)
        return clusters

    async def _validate(
        self, clusters: Sequence[Mapping[str, Any]], routes: Mapping[str, Mapping[str, Any]]
    ) -> None:
        check_references(clusters, routes)
        document = cfg.validation_bootstrap(self.settings, self._services, clusters, routes)
        await validate(document, self.layout.work_dir)

    async def _install(self, splits: dict[str, TrafficSplit]) -> None:
        target = self._clusters(splits)
        target_names = {c["name"] for c in target}
        # Old and new together: the routes still in place keep their clusters meanwhile.
        union = {c["name"]: c for c in self._installed_clusters}
        union.update({c["name"]: c for c in target})
        routes = self._route_tables(splits)
        # Validate both steps before touching anything: nothing invalid is ever installed.
        await self._validate(list(union.values()), routes)
        leaving = sorted(set(union) - target_names)
        if leaving:
            await self._validate(target, routes)

        await self._write_clusters(list(union.values()))
        await self._write_routes(routes)
        self._splits = splits
        await asyncio.to_thread(save_splits, self.layout.splits, splits)
        if leaving:
            await self._wait_drained(leaving)
            await self._write_clusters(target)

    async def _check_may_write(self) -> None:
        if not await self.may_write():
            raise NotLeader("envoy: this trainer no longer leads the traffic plane; not writing")

    async def _write_clusters(self, clusters: list[dict[str, Any]], timeout: float = 30.0) -> None:
        await self._check_may_write()
        self._version += 1
        await _write_yaml(self.layout.cds, cfg.cds_response(str(self._version), clusters))
        self._installed_clusters = clusters
        # Envoy lists the bootstrap's static clusters (the trace collector) too.
        wanted = {c["name"] for c in [*clusters, *cfg.static_clusters(self.settings)]}
        deadline = time.monotonic() + timeout
        while True:
            # Envoy lists only active (warmed) clusters; removed ones disappear.
            try:
                dynamic = set(await self.admin.clusters())
            except TimeoutError:
                dynamic = set()  # busy taking hundreds of clusters: ask again
            if dynamic == wanted:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"envoy did not install clusters {sorted(wanted - dynamic)} / remove "
                    f"{sorted(dynamic - wanted)} within {timeout:g}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_S)

    async def _write_routes(self, routes: Mapping[str, Any], timeout: float = 30.0) -> None:
        # Envoy skips a route table whose content is unchanged (same hash) and keeps its old
        # version_info, so only changed tables are written and waited for (a revision added
        # at 0 % changes clusters, not routes).
        routes = {t: body for t, body in routes.items() if self._installed_routes.get(t) != body}
        if not routes:
            return
        await self._check_may_write()
        self._version += 1
        version = str(self._version)
        for table, body in routes.items():
            await _write_yaml(self.layout.rds(table), cfg.rds_response(version, body))
        self._installed_routes.update(routes)
        deadline = time.monotonic() + timeout
        while True:
            try:
                installed = await self.admin.route_versions()
            except TimeoutError:
                installed = {}  # an Envoy busy taking hundreds of clusters: ask again
            if all(installed.get(t) == version for t in routes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"envoy did not install routes version {version} within {timeout:g}s "
                    f"(installed: {installed}):\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_S)

    async def _wait_drained(self, clusters: Sequence[str]) -> None:
        """Wait (bounded) until no request is in flight on clusters about to be removed."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            active = 0
            for name in clusters:
                values, _ = await self.admin.stats(f"cluster.{name}.upstream_rq_active")
                active += sum(values.values())
            if not active:
                return
            await asyncio.sleep(_POLL_S * 2)
        log.warning(
            "clusters %s still busy after %ss; removing them",
            clusters,
            self.settings.drain_timeout_s,
        )
