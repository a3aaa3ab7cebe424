"""The one gRPC server bootstrap every Cyclone service runs on.

grpc.aio server, per-service health, reflection, request id + metrics around every handler,
optional OpenTelemetry, a Prometheus endpoint, message-size limits, and graceful
shutdown: on SIGTERM/SIGINT health turns NOT_SERVING first, then `stop(grace)` lets
in-flight calls finish.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cyclone.auth import TokenSet
from cyclone.instrumentation import instrument
from cyclone.settings import ServerSettings
from cyclone.telemetry import configure_logging, server_tracing_interceptors

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


def _status(serving: bool) -> Any:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (mutual TLS with a client CA)."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("tls_cert_file and tls_key_file: set both or neither")
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class _InstrumentingRegistrar:
    """Stands in for the server while generated `add_*_to_server` code runs."""

    def __init__(self, server: aio.Server, tokens: TokenSet | None) -> None:
        self._server = server
        self._tokens = tokens
        self.registered = False

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # The same handlers arrive, by name, in add_registered_method_handlers.
        return None

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {
            name: instrument(f"/{service}/{name}", h, self._tokens) for name, h in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)
        self.registered = True


class CycloneServer:
    """A started-on-demand grpc.aio server with Cyclone's cross-cutting parts installed."""

    def __init__(self, component: str, settings: ServerSettings) -> None:
        self.component = component
        self.settings = settings
        configure_logging(settings.log_level)
        self.grpc = aio.server(
            interceptors=server_tracing_interceptors(component),
            options=[*channel_options(settings.max_message_bytes), ("grpc.so_reuseport", 0)],
        )
        self.tokens = (
            TokenSet.from_file(settings.tokens_file, require_data_token=settings.require_data_token)
            if settings.tokens_file
            else None
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self._service_names: list[str] = []
        self._shutdown_hooks: list[Hook] = []
        self._start_hooks: list[Hook] = []
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._held_back: set[str] = set()
        self._serving = False

    def add_service(self, full_name: str, register: Callable[[Any], None]) -> None:
        """Register a servicer through its generated `add_*_to_server`.

        `full_name` is its proto name, used by health and reflection. Every method handler
        is wrapped with the request id and metrics once, here, instead of per call.
        """
        registrar = _InstrumentingRegistrar(self.grpc, self.tokens)
        register(registrar)
        if not registrar.registered:
            raise RuntimeError(f"{full_name}: the generated code registered no methods")
        self._service_names.append(full_name)

    def on_start(self, hook: Hook) -> None:
        """Run `hook` once the server is listening (start background tasks)."""
        self._start_hooks.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Run `hook` after the server stopped taking calls (flush buffers, close pools)."""
        self._shutdown_hooks.append(hook)

    async def set_serving(self, serving: bool) -> None:
        for name in ("", *self._service_names):
            await self.health.set(name, _status(serving and name not in self._held_back))

    async def hold_back(self, full_name: str, held: bool) -> None:
        """Report `full_name` NOT_SERVING while `held`, whatever the server's own state (a
        standby trainer: up, but not the one to serve the trainer service)."""
        if held:
            self._held_back.add(full_name)
        else:
            self._held_back.discard(full_name)
        if self._serving:
            await self.health.set(full_name, _status(not held))

    async def start(self) -> int:
        reflection.enable_server_reflection(
            (
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        self.port = (
            self.grpc.add_secure_port(address, credentials)
            if credentials is not None
            else self.grpc.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        # grpc's health servicer reports SERVING for "" from the start; ours says so only
        # once the start-up hooks (models, Envoy, background work) are done.
        await self.set_serving(False)
        await self.grpc.start()
        for hook in self._start_hooks:
            await hook()
        self._serving = True
        await self.set_serving(True)
        self._start_metrics()
        log.info(
            "%s listening on %s:%d (metrics %s)",
            self.component,
            self.settings.host,
            self.port,
            self.metrics_port or "off",
        )
        return self.port

    def _start_metrics(self) -> None:
        if self.settings.metrics_port < 0:
            return
        from prometheus_client import start_http_server

        server, _thread = start_http_server(self.settings.metrics_port, addr=self.settings.host)
        self._metrics_server = server
        self.metrics_port = int(server.server_port)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, finish in-flight calls within `grace`, then run shutdown hooks."""
        self._serving = False
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.settings.grace_seconds if grace is None else grace)
        for hook in reversed(self._shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("%s: shutdown hook failed", self.component)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
