"""Envoy configuration as plain data: the bootstrap, the clusters (CDS), the listeners (LDS)
and the two route tables (RDS), generated from Cyclone's settings and traffic splits.

Two surfaces. The public listener routes only the data plane: inference (Cyclone API and the
Open Inference Protocol) and label ingestion. The control listener (loopback) also routes the
registry, plans, alerts, monitor and trainer by gRPC service. A model revision is one cluster
(its replica endpoints); each model's route splits traffic with `weighted_clusters` over
per-revision *failover* clusters (aggregate: the revision first, then its siblings), so a
retry after a failed attempt can land on another revision instead of the dead one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cyclone.traffic import Endpoint, Revision, TrafficSplit
from cyclone.wire import MODEL_HEADER, POOL_MODEL_HEADER, POOL_VERSION_HEADER

PUBLIC = "public"
CONTROL = "control"
ROUTE_TABLES = (PUBLIC, CONTROL)
DESCRIPTOR = Path(__file__).with_name("cyclone.binpb")

INFERENCE_SERVICE = "cyclone.inference.v1.InferenceService"
OIP_SERVICE = "inference.GRPCInferenceService"
STORE_SERVICE = "cyclone.store.v1.StoreService"
MONITOR_SERVICE = "cyclone.monitor.v1.MonitorService"
TRAINER_SERVICE = "cyclone.trainer.v1.TrainerService"
# Label ingestion: the only store RPCs on the public listener.
PUBLIC_STORE_METHODS = ("AddLabels", "AddLabelsStream")
# Store calls that may run twice with the same effect (reads; ingest is idempotent on
# prediction id, labels are last-write-wins, a holder's lease calls renew its own leases):
# Envoy retries these on another store when one dies mid-call. Every other store call is
# retried only when it never reached a store (connection refused, stream refused).
STORE_IDEMPOTENT_METHODS = (
    "LogPredictions",
    "AddLabels",
    "AddLabelsStream",
    "GetTrainingData",
    "QueryPredictions",
    "GetModelVersion",
    "ListModelVersions",
    "GetStats",
    "GetPlan",
    "GetHealth",
    "ListMetricPoints",
    "ListPredictionStats",
    "ListAlerts",
    "GetTrainingJob",
    "ListTrainingJobs",
    "GetRollout",
    "ListRollouts",
    "LeaseModels",
    "ReleaseModelLeases",
    "HeartbeatTrainingJobs",
    # A retried take hands the caller a newer epoch; a retried release ends nothing twice.
    "AcquireRoleLease",
    "ReleaseRoleLease",
)

STORE_CLUSTER = "cyclone-store"
TRACE_COLLECTOR_CLUSTER = "cyclone-otel-collector"
MONITOR_CLUSTER = "cyclone-monitor"
TRAINER_CLUSTER = "cyclone-trainer"
FAILOVER_SUFFIX = "~failover"

_T = "type.googleapis.com/"
_CLUSTER = _T + "envoy.config.cluster.v3.Cluster"
_LISTENER = _T + "envoy.config.listener.v3.Listener"
_ROUTES = _T + "envoy.config.route.v3.RouteConfiguration"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_BUFFER = "envoy.filters.http.buffer"
_BUFFER_PER_ROUTE = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute"

# gRPC status codes used in direct responses.
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_UNIMPLEMENTED = 12


@dataclasses.dataclass(frozen=True)
class EnvoySettings:
    """Where Envoy listens, where the components are, and how it checks revisions.

    Ports: 0 picks a free port (read back from Envoy's admin). The admin interface and the
    control listener bind to loopback; only the public listener should face clients.
    """

    work_dir: Path
    public_host: str = "0.0.0.0"
    public_port: int = 8080
    control_host: str = "127.0.0.1"
    control_port: int = 8081
    admin_port: int = 0
    store: Endpoint | None = None
    # More store processes over the same database, in the store's cluster with `store`:
    # health-checked, ejected on failures, and idempotent calls retried on a sibling.
    extra_stores: tuple[Endpoint, ...] = ()
    monitor: Endpoint | None = None
    trainer: Endpoint | None = None
    # More trainers: the trainer cluster then routes only to the one whose gRPC health says
    # SERVING for the trainer service (the traffic plane's leader; standbys say NOT_SERVING).
    extra_trainers: tuple[Endpoint, ...] = ()
    descriptor: Path = DESCRIPTOR
    concurrency: int | None = None  # worker threads; None = one per core
    health_interval_s: float = 1.0
    # A pooled revision's cluster checks a healthy member this often (an unhealthy one every
    # `health_interval_s`). Every pooled cluster checks the same few processes: at 1 s, 500
    # models cost the pool ~1,000 checks a second, a third of a core with no traffic at all
    # (bench/pool_scale.py). A member that dies refuses connections; outlier detection ejects
    # it per cluster on its first failed requests, which Envoy retries on the other members.
    pool_health_interval_s: float = 10.0
    # How long a health check may take. Longer than the interval on purpose: a revision slow
    # to answer on a loaded machine is still serving, and marking it unhealthy can leave a
    # killed sibling as the only place a failed-over retry may go. A dead revision refuses
    # the connection at once, so this only delays noticing a hung one.
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    num_retries: int = 3
    retry_budget_percent: float = 25.0
    # Scale to zero: a request to a stopped revision is held this long (retried on connect
    # failure with back-off) while the trainer starts the revision again; 0 = fail fast.
    cold_start_hold_s: float = 0.0
    drain_timeout_s: float = 10.0
    log_level: str = "warning"
    # TLS on the public listener: both files (PEM) or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # TLS to the services (when they serve TLS): the CA that signed their certificates, and
    # Envoy's client certificate when they require one (mTLS).
    upstream_tls_ca_file: Path | None = None
    upstream_tls_cert_file: Path | None = None
    upstream_tls_key_file: Path | None = None
    # Limits at the edge. A REST body over `max_request_bytes` is refused on the public
    # listener (413; gRPC messages are bounded by the services' receive limit, 4 MiB); it is
    # also each connection's buffer, so a slow reader cannot make Envoy hold more.
    max_request_bytes: int = 4 * 1024 * 1024
    max_headers_count: int = 100
    stream_idle_timeout_s: float = 300.0
    max_connections: int = 50_000  # open downstream connections, all listeners together
    # Requests per second per client address on the public listener (a token bucket of
    # `rate_limit_burst`, default twice the rate); None turns it off. Excess: 429 /
    # RESOURCE_EXHAUSTED. Up to `rate_limit_clients` addresses get a bucket each.
    rate_limit_per_client: int | None = 1000
    rate_limit_burst: int | None = None
    rate_limit_clients: int = 10_000
    # A pooled model's requests go to one member by a hash of the model; with a bound, a member
    # past this percentage of the mean outstanding requests passes the next one on (Envoy's
    # consistent hashing with bounded loads), so one hot model can use every member.
    pool_hash_balance_percent: int | None = None
    # OpenTelemetry: Envoy sends its spans over OTLP gRPC to this collector (off when None).
    otlp_collector: Endpoint | None = None
    trace_sampling_percent: float = 100.0

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        if (self.upstream_tls_cert_file is None) != (self.upstream_tls_key_file is None):
            raise ValueError(
                "upstream_tls_cert_file and upstream_tls_key_file: give both or neither"
            )
        if self.upstream_tls_cert_file is not None and self.upstream_tls_ca_file is None:
            raise ValueError("upstream_tls_cert_file: needs upstream_tls_ca_file (TLS is off)")
        if self.rate_limit_per_client is not None and self.rate_limit_per_client < 1:
            raise ValueError("rate_limit_per_client: must be 1 or more (None turns it off)")
        if not 0 <= self.trace_sampling_percent <= 100:
            raise ValueError("trace_sampling_percent: must be between 0 and 100")
        if self.pool_hash_balance_percent is not None and self.pool_hash_balance_percent < 100:
            raise ValueError(
                "pool_hash_balance_percent: must be 100 or more (None turns the bound off), "
                f"got {self.pool_hash_balance_percent}"
            )
        if self.cold_start_hold_s < 0:
            raise ValueError("cold_start_hold_s: must be 0 (off) or more")
        if self.health_interval_s <= 0:
            raise ValueError("health_interval_s: must be more than 0")
        if self.pool_health_interval_s <= 0:
            raise ValueError("pool_health_interval_s: must be more than 0")
        if self.health_timeout_s <= 0:
            raise ValueError("health_timeout_s: must be more than 0")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The files Envoy reads from `work_dir` (xDS files are replaced by rename only)."""

    work_dir: Path

    @property
    def bootstrap(self) -> Path:
        return self.work_dir / "bootstrap.yaml"

    @property
    def xds_dir(self) -> Path:
        return self.work_dir / "xds"

    @property
    def cds(self) -> Path:
        return self.xds_dir / "cds.yaml"

    @property
    def lds(self) -> Path:
        return self.xds_dir / "lds.yaml"

    def rds(self, table: str) -> Path:
        return self.xds_dir / f"rds-{table}.yaml"

    @property
    def admin_address(self) -> Path:
        return self.work_dir / "admin-address.txt"

    @property
    def splits(self) -> Path:
        """The splits behind the installed routes, so a new driver carries on from them."""
        return self.work_dir / "splits.json"

    @property
    def log(self) -> Path:
        return self.work_dir / "envoy.log"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _file_source(path: Path) -> dict[str, Any]:
    return {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
    }


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _runtime(settings: EnvoySettings) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    if settings.otlp_collector is not None:
        # Spans leave Envoy within a second (the default waits five).
        layer["tracing.opentelemetry.flush_interval_ms"] = 1000
    return {"layers": [{"name": "static", "static_layer": layer}]}


def _overload(settings: EnvoySettings) -> dict[str, Any]:
    """A cap on open downstream connections: past it, new ones are closed at accept."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _T + "envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": settings.max_connections,
                },
            }
        ]
    }


def bootstrap(settings: EnvoySettings, layout: Layout) -> dict[str, Any]:
    """Admin on loopback; listeners and clusters come from the watched xDS files (the trace
    collector's cluster is static: Envoy's gRPC clients need a static cluster)."""
    document: dict[str, Any] = {
        "node": {"id": "cyclone-envoy", "cluster": "cyclone"},
        "admin": {"address": _socket("127.0.0.1", settings.admin_port)},
        "dynamic_resources": {
            "lds_config": _file_source(layout.lds),
            "cds_config": _file_source(layout.cds),
        },
        "layered_runtime": _runtime(settings),
        # Histogram quantiles (latency) in /stats are as of the last flush.
        "stats_flush_interval": "1s",
        "overload_manager": _overload(settings),
    }
    static = static_clusters(settings)
    if static:
        document["static_resources"] = {"clusters": static}
    return document


def discovery_response(version: str, type_url: str, resources: Sequence[Any]) -> dict[str, Any]:
    """The body of one xDS file: what a management server would send."""
    return {
        "version_info": version,
        "resources": [{"@type": type_url, **resource} for resource in resources],
    }


def cds_response(version: str, clusters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return discovery_response(version, _CLUSTER, clusters)


def lds_response(version: str, listeners: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return discovery_response(version, _LISTENER, listeners)


def rds_response(version: str, routes: Mapping[str, Any]) -> dict[str, Any]:
    return discovery_response(version, _ROUTES, [routes])


# --- clusters -------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _http2(upstream_filters: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": _T + _HTTP_OPTIONS,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    if upstream_filters:
        options["http_filters"] = list(upstream_filters)
    return {_HTTP_OPTIONS: options}


def _retry_budget(settings: EnvoySettings) -> dict[str, Any]:
    # Retries may add at most this share of the active requests: a dying revision cannot
    # turn every request into four. While a stopped revision wakes, every caller waits in a
    # retry back-off, so the floor is raised to let a burst of first callers wait together.
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "retry_budget": {
                    "budget_percent": {"value": settings.retry_budget_percent},
                    "min_retry_concurrency": 64 if settings.cold_start_hold_s > 0 else 8,
                },
            }
        ]
    }


def _upstream_tls(settings: EnvoySettings) -> dict[str, Any]:
    if settings.upstream_tls_ca_file is None:
        return {}
    context: dict[str, Any] = {
        "validation_context": {"trusted_ca": {"filename": str(settings.upstream_tls_ca_file)}},
        "alpn_protocols": ["h2"],
    }
    if settings.upstream_tls_cert_file is not None and settings.upstream_tls_key_file is not None:
        context["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(settings.upstream_tls_cert_file)},
                "private_key": {"filename": str(settings.upstream_tls_key_file)},
            }
        ]
    return {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": context,
            },
        }
    }


def endpoint_cluster(
    name: str,
    endpoints: Sequence[Endpoint],
    settings: EnvoySettings,
    *,
    health_checked: bool,
    tls: bool = True,
    health_service: str = "",
) -> dict[str, Any]:
    """A cluster of gRPC endpoints (STATIC for IP addresses, STRICT_DNS for host names)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all(_is_ip(e.host) for e in endpoints) else "STRICT_DNS",
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": _http2(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket(e.host, e.port)}} for e in endpoints
                    ]
                }
            ],
        },
        "circuit_breakers": _retry_budget(settings),
        **(_upstream_tls(settings) if tls else {}),
    }
    if health_checked:
        interval = _seconds(settings.health_interval_s)
        cluster["health_checks"] = [
            {
                "timeout": _seconds(settings.health_timeout_s),
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": health_service},
            }
        ]
        cluster["outlier_detection"] = {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 2,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
            "split_external_local_origin_errors": True,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 100,
        }
    return cluster


def revision_cluster(revision: Revision, settings: EnvoySettings) -> dict[str, Any]:
    cluster = endpoint_cluster(revision.name, revision.endpoints, settings, health_checked=True)
    if revision.pooled:
        check = cluster["health_checks"][0]
        check["interval"] = check["no_traffic_interval"] = _seconds(
            max(settings.pool_health_interval_s, settings.health_interval_s)
        )
        check["unhealthy_interval"] = _seconds(settings.health_interval_s)
        cluster["typed_extension_protocol_options"] = _http2(_pool_headers(revision))
        # Each model on one member by a hash of the route's key (`_POOL_HASH`), not on all:
        # a member holds half the models, so twice as many fit before evictions.
        cluster["lb_policy"] = "MAGLEV"
        if settings.pool_hash_balance_percent is not None:
            cluster["common_lb_config"] = {
                "consistent_hashing_lb_config": {
                    "hash_balance_factor": settings.pool_hash_balance_percent
                }
            }
    return cluster


def _pool_headers(revision: Revision) -> list[dict[str, Any]]:
    """Upstream filters naming the version a pooled revision's processes answer, set by the
    clusters themselves: the weighted route's failover cluster and the revision's own (which
    the shadow mirror names). Health checks stay per process."""
    headers = {POOL_MODEL_HEADER: revision.model, POOL_VERSION_HEADER: revision.version}
    return [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        {
                            "append": {
                                "header": {"key": key, "value": value},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        }
                        for key, value in headers.items()
                    ]
                },
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def failover_name(revision_name: str) -> str:
    return revision_name + FAILOVER_SUFFIX


def failover_cluster(
    revision_name: str,
    siblings: Sequence[str],
    settings: EnvoySettings,
    pooled: Revision | None = None,
) -> dict[str, Any]:
    """Aggregate cluster: the revision, then its siblings, as priorities. Retries use
    `previous_priorities`, so a failed attempt on a dead revision is retried on another.

    The router runs the upstream filters of the cluster the route names -- this aggregate --
    so a `pooled` revision's version headers are set here too (a retry that fails over to a
    sibling's processes still asks for the version the route chose)."""
    order = [revision_name, *(s for s in siblings if s != revision_name)]
    return {
        "name": failover_name(revision_name),
        "connect_timeout": _seconds(settings.connect_timeout_s),
        "lb_policy": "CLUSTER_PROVIDED",
        "typed_extension_protocol_options": _http2(_pool_headers(pooled) if pooled else ()),
        "circuit_breakers": _retry_budget(settings),
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": _T + "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": order,
            },
        },
    }


def component_clusters(settings: EnvoySettings) -> list[dict[str, Any]]:
    clusters = []
    if settings.monitor is not None:
        clusters.append(
            endpoint_cluster(MONITOR_CLUSTER, [settings.monitor], settings, health_checked=False)
        )
    if settings.trainer is not None:
        clusters.append(trainer_cluster(settings))
    stores = store_endpoints(settings)
    if stores:
        # Several stores: a dead one is found by its health checks and ejected after its
        # first failures, so calls go to the live ones.
        clusters.insert(
            0, endpoint_cluster(STORE_CLUSTER, stores, settings, health_checked=len(stores) > 1)
        )
    return clusters


def trainer_cluster(settings: EnvoySettings) -> dict[str, Any]:
    """One trainer: its endpoint. Several: all of them, health-checked on the trainer service,
    which only the traffic plane's leader reports SERVING; with no leader (the old one died,
    the next not elected yet) Envoy answers UNAVAILABLE instead of trying a standby."""
    assert settings.trainer is not None
    trainers = [settings.trainer, *settings.extra_trainers]
    several = len(trainers) > 1
    cluster = endpoint_cluster(
        TRAINER_CLUSTER,
        trainers,
        settings,
        health_checked=several,
        health_service=TRAINER_SERVICE if several else "",
    )
    if several:
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def store_endpoints(settings: EnvoySettings) -> list[Endpoint]:
    """Every store process behind the store cluster (none without a store)."""
    if settings.store is None:
        return []
    return [settings.store, *settings.extra_stores]


def static_clusters(settings: EnvoySettings) -> list[dict[str, Any]]:
    """Clusters in the bootstrap rather than CDS: the OTLP collector, when tracing is on."""
    if settings.otlp_collector is None:
        return []
    return [
        endpoint_cluster(
            TRACE_COLLECTOR_CLUSTER,
            [settings.otlp_collector],
            settings,
            health_checked=False,
            tls=False,  # a collector is not a Cyclone service
        )
    ]


def split_clusters(split: TrafficSplit, settings: EnvoySettings) -> list[dict[str, Any]]:
    """Every revision of the split (weighted, zero-weight and shadow) and the failover
    clusters its route names."""
    clusters = [revision_cluster(split.revisions[n], settings) for n in sorted(split.revisions)]
    weighted = _weighted(split)
    clusters += [
        failover_cluster(
            n, weighted, settings, split.revisions[n] if split.revisions[n].pooled else None
        )
        for n in weighted
    ]
    return clusters


def _weighted(split: TrafficSplit) -> list[str]:
    """Revisions with traffic, heaviest first (the failover order)."""
    return sorted(
        (n for n, w in split.weights.items() if w > 0), key=lambda n: (-split.weights[n], n)
    )


# --- routes ---------------------------------------------------------------------------------


# Envoy's back-off is fully jittered: attempt n waits a uniform time up to
# min((2^n - 1) * base, max), so once capped a retry waits max / 2 on average.
_COLD_BASE_S = 0.25
_COLD_MAX_S = 1.0


def _retry_policy(settings: EnvoySettings) -> dict[str, Any]:
    retries, back_off = settings.num_retries, {"base_interval": "0.01s", "max_interval": "0.1s"}
    if settings.cold_start_hold_s > 0:
        # Enough slow retries to span the hold: the caller waits for the revision to wake.
        retries = max(retries, math.ceil(settings.cold_start_hold_s / (_COLD_MAX_S / 2)))
        back_off = {
            "base_interval": _seconds(_COLD_BASE_S),
            "max_interval": _seconds(_COLD_MAX_S),
        }
    return {
        "retry_on": "connect-failure,refused-stream,unavailable,reset",
        "num_retries": retries,
        "retry_back_off": back_off,
        "retry_host_predicate": _previous_hosts(),
        "host_selection_retry_max_attempts": 3,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": _T
                + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        },
    }


# Where a pooled model's requests go among the pool's members: by the model (its header for
# gRPC, the path for REST), so one member holds it; a dead member's share moves to the others.
_POOL_HASH = [{"header": {"header_name": MODEL_HEADER}}, {"header": {"header_name": ":path"}}]


def _model_action(split: TrafficSplit, settings: EnvoySettings) -> dict[str, Any]:
    weighted = _weighted(split)
    action: dict[str, Any] = {
        "weighted_clusters": {
            "clusters": [{"name": failover_name(n), "weight": split.weights[n]} for n in weighted]
        },
        "timeout": "0s",  # streams may be long; gRPC deadlines still apply (below)
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        "retry_policy": _retry_policy(settings),
    }
    if any(r.pooled for r in split.revisions.values()):
        action["hash_policy"] = _POOL_HASH
    if split.shadow:
        action["request_mirror_policies"] = [
            {
                "cluster": split.shadow,
                "runtime_fraction": {
                    "default_value": {
                        "numerator": round(split.shadow_percent * 10_000),
                        "denominator": "MILLION",
                    }
                },
            }
        ]
    return action


def _cluster_action(cluster: str) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "timeout": "0s",
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
    }


def _grpc_error(code: int, message: str) -> dict[str, Any]:
    """A trailers-only gRPC response: HTTP 200, no body, grpc-status in the headers."""
    headers = {
        "content-type": "application/grpc",
        "grpc-status": str(code),
        "grpc-message": message,
    }
    return {
        "direct_response": {"status": 200},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in headers.items()
        ],
    }


def _json_error(status: int, code: int, message: str) -> dict[str, Any]:
    """The JSON the transcoder produces for gRPC errors, so REST callers see one shape."""
    escaped = message.replace("\\", "\\\\").replace('"', '\\"')
    return {
        "direct_response": {
            "status": status,
            "body": {"inline_string": f'{{"code":{code},"message":"{escaped}","details":[]}}'},
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def _json_listing(names: list[str]) -> dict[str, Any]:
    """`GET /v1/models` with several models: their names, in ListModels' JSON shape (no one
    upstream serves them all; `GET /v1/models/{model}` describes one)."""
    body = json.dumps({"models": [{"name": n} for n in names]}, separators=(",", ":"))
    return {
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def _header(model: str) -> dict[str, Any]:
    return {"name": MODEL_HEADER, "string_match": {"exact": model}}


def _present() -> dict[str, Any]:
    return {"name": MODEL_HEADER, "present_match": True}


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _regex(pattern: str) -> dict[str, Any]:
    return {"safe_regex": {"regex": pattern}}


_INFERENCE_PREFIXES = (f"/{INFERENCE_SERVICE}/", f"/{OIP_SERVICE}/")
# `GET /v1/models` lists every model from the route table (Envoy's default cap is 4 KiB: about
# 150 names); error messages, sent as a header, name the first few.
_MAX_LISTING_BYTES = 1 << 20
_NAMES_IN_MESSAGES = 20


def _some_names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:_NAMES_IN_MESSAGES])
    more = len(names) - _NAMES_IN_MESSAGES
    return shown + (f" and {more} more" if more > 0 else "")


def inference_routes(
    splits: Mapping[str, TrafficSplit], settings: EnvoySettings
) -> list[dict[str, Any]]:
    """gRPC by the `cyclone-model` header, REST by the model in the path; one model registered
    means requests without the header go to it, otherwise a clear error naming the header."""
    routes: list[dict[str, Any]] = []
    for model in sorted(splits):
        action = _model_action(splits[model], settings)
        routes += [
            {"match": {"prefix": p, "grpc": {}, "headers": [_header(model)]}, "route": action}
            for p in _INFERENCE_PREFIXES
        ]
        routes += [
            {
                "match": {"path": f"/v1/models/{model}:predict", "headers": [_method("POST")]},
                "route": action,
            },
            {
                "match": {"path": f"/v1/models/{model}", "headers": [_method("GET")]},
                "route": action,
            },
            {
                "match": {"path": "/v1/models", "headers": [_method("GET"), _header(model)]},
                "route": action,
            },
        ]
    served = _some_names(sorted(splits))
    unknown = (
        f"model %REQ({MODEL_HEADER})% is not served here (header {MODEL_HEADER}); served: {served}"
    )
    routes += [
        {
            "match": {"prefix": p, "grpc": {}, "headers": [_present()]},
            **_grpc_error(_NOT_FOUND, unknown),
        }
        for p in _INFERENCE_PREFIXES
    ]
    if len(splits) == 1:
        [only] = splits.values()
        action = _model_action(only, settings)
        routes += [
            {"match": {"prefix": p, "grpc": {}}, "route": action} for p in _INFERENCE_PREFIXES
        ]
        routes.append(
            {"match": {"path": "/v1/models", "headers": [_method("GET")]}, "route": action}
        )
    else:
        missing = (
            f"header {MODEL_HEADER} is required: it names the model to route to "
            f"({len(splits)} models are served: {_some_names(sorted(splits))})"
        )
        routes += [
            {"match": {"prefix": p, "grpc": {}}, **_grpc_error(_INVALID_ARGUMENT, missing)}
            for p in _INFERENCE_PREFIXES
        ]
        routes.append(
            {
                "match": {"path": "/v1/models", "headers": [_method("GET")]},
                **_json_listing(sorted(splits)),
            }
        )
    routes += [
        {
            # A served model's predict path asked with GET (a browser, curl without -d): not
            # "not served", which the next route would say.
            "match": {
                **_regex(r"/v1/models/[^/]+:predict"),
                "headers": [{**_method("POST"), "invert_match": True}],
            },
            **_json_error(405, _UNIMPLEMENTED, "predict takes POST with a JSON body"),
        },
        {
            "match": _regex(r"/v1/models/[^/]+"),
            **_json_error(
                404,
                _NOT_FOUND,
                f"model is not served here (the path names the model); served: {served}",
            ),
        },
        {
            "match": {"prefix": "/v2/"},
            **_json_error(
                404,
                _NOT_FOUND,
                "the Open Inference Protocol is served over gRPC here"
                f" ({OIP_SERVICE}); over REST: POST /v1/models/{{model}}:predict",
            ),
        },
    ]
    return routes


def _previous_hosts() -> list[dict[str, Any]]:
    """A retry's host predicate: try a host other than the ones that already failed it."""
    return [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ]


def _store_action(settings: EnvoySettings, *, idempotent: bool) -> dict[str, Any]:
    """To the store cluster; with several stores, retried on a sibling: any call that never
    reached a store, and an idempotent one that a dying store dropped."""
    action = _cluster_action(STORE_CLUSTER)
    if settings.extra_stores:
        retry_on = "connect-failure,refused-stream"
        if idempotent:
            retry_on += ",unavailable,reset"
        action["retry_policy"] = {
            "retry_on": retry_on,
            "num_retries": settings.num_retries,
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
            "retry_host_predicate": _previous_hosts(),
            "host_selection_retry_max_attempts": 3,
        }
    return action


def store_routes(settings: EnvoySettings) -> list[dict[str, Any]]:
    """The store's gRPC routes on the control listener: its idempotent methods (retried on a
    sibling store when one dies mid-call), then every other method."""
    if settings.store is None:
        return []
    # One route per method: a regex of them all is past Envoy's RE2 program size limit.
    return [
        *(
            {
                "match": {"path": f"/{STORE_SERVICE}/{method}", "grpc": {}},
                "route": _store_action(settings, idempotent=True),
            }
            for method in STORE_IDEMPOTENT_METHODS
        ),
        {
            "match": {"prefix": f"/{STORE_SERVICE}/"},
            "route": _store_action(settings, idempotent=False),
        },
    ]


def label_routes(settings: EnvoySettings) -> list[dict[str, Any]]:
    if settings.store is None:
        return []
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": f"/{STORE_SERVICE}/{m}", "grpc": {}},
            "route": _store_action(settings, idempotent=m in STORE_IDEMPOTENT_METHODS),
        }
        for m in PUBLIC_STORE_METHODS
    ]
    routes.append(
        {
            "match": {**_regex(r"/v1/models/[^/]+/labels"), "headers": [_method("POST")]},
            "route": _store_action(settings, idempotent=True),
        }
    )
    return routes


def public_routes(splits: Mapping[str, TrafficSplit], settings: EnvoySettings) -> dict[str, Any]:
    """Data plane only. Everything else: UNIMPLEMENTED for gRPC, 404 for REST."""
    closed = "not available on the public listener"
    routes = [
        *label_routes(settings),
        *inference_routes(splits, settings),
        {"match": {"prefix": "/", "grpc": {}}, **_grpc_error(_UNIMPLEMENTED, closed)},
        {"match": {"prefix": "/"}, **_json_error(404, _NOT_FOUND, closed)},
    ]
    # The body limit buffers whole requests: right for REST, wrong for gRPC streams.
    unbuffered = {_BUFFER: {"@type": _T + _BUFFER_PER_ROUTE, "disabled": True}}
    routes = [
        {**r, "typed_per_filter_config": unbuffered} if "grpc" in r["match"] else r for r in routes
    ]
    return {
        "name": PUBLIC,
        "virtual_hosts": [{"name": PUBLIC, "domains": ["*"], "routes": routes}],
        "max_direct_response_body_size_bytes": _MAX_LISTING_BYTES,
    }


def control_routes(splits: Mapping[str, TrafficSplit], settings: EnvoySettings) -> dict[str, Any]:
    """The control plane by gRPC service, plus the data plane (one address for operators)."""
    components = [
        (MONITOR_SERVICE, MONITOR_CLUSTER, settings.monitor),
        (TRAINER_SERVICE, TRAINER_CLUSTER, settings.trainer),
    ]
    routes = store_routes(settings) if settings.extra_stores else []
    if settings.store is not None and not settings.extra_stores:
        routes.append(
            {"match": {"prefix": f"/{STORE_SERVICE}/"}, "route": _cluster_action(STORE_CLUSTER)}
        )
    routes += [
        {"match": {"prefix": f"/{service}/"}, "route": _cluster_action(cluster)}
        for service, cluster, address in components
        if address is not None
    ]
    routes += inference_routes(splits, settings)
    unknown = "no such service on the control listener"
    routes += [
        {"match": {"prefix": "/", "grpc": {}}, **_grpc_error(_UNIMPLEMENTED, unknown)},
        {"match": {"prefix": "/"}, **_json_error(404, _NOT_FOUND, unknown)},
    ]
    return {
        "name": CONTROL,
        "virtual_hosts": [{"name": CONTROL, "domains": ["*"], "routes": routes}],
        "max_direct_response_body_size_bytes": _MAX_LISTING_BYTES,
    }


# --- listeners ------------------------------------------------------------------------------


def _transcoder(
    settings: EnvoySettings, services: Sequence[str], *, match_incoming: bool
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": _T
            + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(settings.descriptor),
            "services": list(services),
            # Public: routes match the HTTP path the caller sent, so only data-plane paths
            # are routed. Control: routes match the transcoded gRPC path (by service).
            "match_incoming_request_route": match_incoming,
            "convert_grpc_status": True,
            "print_options": {"always_print_primitive_fields": True},
        },
    }


def _rate_limit(settings: EnvoySettings, rate: int) -> dict[str, Any]:
    """One token bucket per client address (a descriptor entry without a value is a wildcard:
    each address seen gets its own bucket), so one caller cannot starve the others."""
    burst = settings.rate_limit_burst or 2 * rate
    bucket = {"max_tokens": burst, "tokens_per_fill": rate, "fill_interval": "1s"}
    everyone = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "per_client",
            "token_bucket": bucket,  # only for a request without an address (none in practice)
            "filter_enabled": {**everyone, "runtime_key": "cyclone.rate_limit.enabled"},
            "filter_enforced": {**everyone, "runtime_key": "cyclone.rate_limit.enforced"},
            "rate_limits": [{"actions": [{"remote_address": {}}]}],
            "descriptors": [{"entries": [{"key": "remote_address"}], "token_bucket": bucket}],
            "max_dynamic_descriptors": settings.rate_limit_clients,
            "always_consume_default_token_bucket": False,
            "rate_limited_as_resource_exhausted": True,  # gRPC callers: RESOURCE_EXHAUSTED
        },
    }


def _http_filters(settings: EnvoySettings, services: Sequence[str], *, public: bool) -> list[Any]:
    limit = (
        []
        if not public or settings.rate_limit_per_client is None
        else [_rate_limit(settings, settings.rate_limit_per_client)]
    )
    body_limit = (
        [
            {
                "name": _BUFFER,
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": settings.max_request_bytes,
                },
            }
        ]
        if public
        else []
    )
    return [
        *limit,  # first: a refused request costs no transcoding
        *body_limit,
        _transcoder(settings, services, match_incoming=public),
        {
            "name": "envoy.filters.http.grpc_stats",
            "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                "stats_for_all_methods": True,
                "enable_upstream_stats": True,
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _tracing(settings: EnvoySettings) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: a span per request, its context sent upstream as
    `traceparent`, so the service's span is the child of Envoy's."""
    if settings.otlp_collector is None:
        return {}
    return {
        "tracing": {
            "random_sampling": {"value": settings.trace_sampling_percent},
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": _T + "envoy.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": TRACE_COLLECTOR_CLUSTER},
                        "timeout": "1s",
                    },
                    "service_name": "cyclone-envoy",
                },
            },
        }
    }


def _downstream_tls(settings: EnvoySettings) -> dict[str, Any]:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    return {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(settings.tls_cert_file)},
                            "private_key": {"filename": str(settings.tls_key_file)},
                        }
                    ],
                    "alpn_protocols": ["h2", "http/1.1"],
                },
            },
        }
    }


def listener(
    name: str,
    host: str,
    port: int,
    http_filters: list[Any],
    route_source: Mapping[str, Any],
    settings: EnvoySettings,
    *,
    public: bool = False,
) -> dict[str, Any]:
    """`route_source` is either {"rds": ...} (running) or {"route_config": ...} (validation)."""
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": _HCM,
                    "stat_prefix": name,
                    "codec_type": "AUTO",
                    "http2_protocol_options": {},
                    "stream_idle_timeout": _seconds(settings.stream_idle_timeout_s),
                    # Too many headers: 431 (HTTP/1) or a reset stream (HTTP/2).
                    "common_http_protocol_options": {
                        "max_headers_count": settings.max_headers_count
                    },
                    **_tracing(settings),
                    "http_filters": http_filters,
                    **route_source,
                },
            }
        ]
    }
    if public:
        chain.update(_downstream_tls(settings))
    return {
        "name": name,
        "address": _socket(host, port),
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [chain],
    }


def transcoded_services(settings: EnvoySettings, available: set[str]) -> dict[str, list[str]]:
    """Which services each listener transcodes to REST, limited to those in the descriptor.

    The control listener leaves the store's REST out: its plan and alert paths are the same
    as the monitor's (the monitor's validate; the store's are what the monitor calls).
    """
    public = [INFERENCE_SERVICE, *([STORE_SERVICE] if settings.store else [])]
    control = [INFERENCE_SERVICE]
    if settings.monitor:
        control.append(MONITOR_SERVICE)
    if settings.trainer:
        control.append(TRAINER_SERVICE)
    return {
        PUBLIC: [s for s in public if s in available],
        CONTROL: [s for s in control if s in available],
    }


def listeners(
    settings: EnvoySettings,
    available: set[str],
    route_sources: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    services = transcoded_services(settings, available)
    return [
        listener(
            PUBLIC,
            settings.public_host,
            settings.public_port,
            _http_filters(settings, services[PUBLIC], public=True),
            route_sources[PUBLIC],
            settings,
            public=True,
        ),
        listener(
            CONTROL,
            settings.control_host,
            settings.control_port,
            _http_filters(settings, services[CONTROL], public=False),
            route_sources[CONTROL],
            settings,
        ),
    ]


def rds_sources(layout: Layout) -> dict[str, dict[str, Any]]:
    return {
        table: {
            "rds": {"route_config_name": table, "config_source": _file_source(layout.rds(table))}
        }
        for table in (PUBLIC, CONTROL)
    }


def validation_bootstrap(
    settings: EnvoySettings,
    available: set[str],
    clusters: Sequence[Mapping[str, Any]],
    routes: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Everything inline (static), so `envoy --mode validate` checks clusters, listeners and
    routes together, including that every route names a known cluster."""
    sources = {table: {"route_config": dict(routes[table])} for table in (PUBLIC, CONTROL)}
    return {
        "node": {"id": "cyclone-envoy-validate", "cluster": "cyclone"},
        "admin": {"address": _socket("127.0.0.1", 0)},
        "static_resources": {
            "clusters": [*static_clusters(settings), *clusters],
            "listeners": listeners(settings, available, sources),
        },
        "layered_runtime": _runtime(settings),
        "overload_manager": _overload(settings),
    }
