"""OpenTelemetry and logging set-up shared by every service.

Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: without a collector
there is nothing to send spans to, and the interceptor costs every call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from cyclone.instrumentation import request_id_var

_configured_service: str | None = None
# W3C trace context, version 00 as written; all-zero ids are invalid.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
AttributeValue = str | bool | int | float


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


def configure_logging(level: str) -> None:
    """One log format for every service, with the current request id."""
    root = logging.getLogger()
    if any(isinstance(f, _RequestIdFilter) for h in root.handlers for f in h.filters):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())


def tracing_enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_tracing(service_name: str, exporter: Any = None) -> bool:
    """Install a span exporter once per process (OTLP unless one is given); False when off."""
    global _configured_service
    if not tracing_enabled():
        return False
    if _configured_service is not None:
        return True
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"cyclone-{service_name}"}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured_service = service_name
    return True


def server_tracing_interceptors(service_name: str) -> list[Any]:
    if not configure_tracing(service_name):
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def current_trace_id() -> str:
    """Hex trace id of the active span, or "" when tracing is off."""
    if _configured_service is None:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def valid_traceparent(text: str) -> bool:
    """A W3C `traceparent` header value (version ff is forbidden by the spec)."""
    return _TRACEPARENT.fullmatch(text) is not None and not text.startswith("ff")


def trace_id_of(traceparent: str) -> str:
    """The hex trace id a traceparent names, or "" when it is not one."""
    return traceparent.split("-")[1] if valid_traceparent(traceparent) else ""


def current_traceparent() -> str:
    """The active span as a W3C traceparent, or "" when tracing is off or no span is active."""
    if _configured_service is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def traceparent_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata continuing the active trace in the callee (its server interceptor reads
    `traceparent`); empty when there is nothing to continue."""
    traceparent = current_traceparent()
    return (("traceparent", traceparent),) if traceparent else ()


@contextlib.contextmanager
def span(
    name: str, *, parent: str = "", attributes: Mapping[str, AttributeValue] | None = None
) -> Iterator[None]:
    """Run the block in a span: a child of `parent` (a traceparent) when given and valid, else
    of the active span. Nothing happens when tracing is off."""
    if _configured_service is None:
        yield
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = None
    if valid_traceparent(parent):
        context = TraceContextTextMapPropagator().extract({"traceparent": parent})
    tracer = trace.get_tracer("cyclone")
    with tracer.start_as_current_span(name, context=context, attributes=attributes):
        yield


def add_event(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """Mark a moment (a job stage, say) on the active span; nothing when tracing is off."""
    if _configured_service is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes)
