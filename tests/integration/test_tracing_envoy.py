"""One trace across the mesh: Envoy's OpenTelemetry tracer starts it, the inference server's
span is its child, and the trace id is stored with the prediction row. Spans go over OTLP gRPC
to a collector run by the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from cyclone.client import build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.traffic import Endpoint, Revision, TrafficSplit
from services.launch import spawn, start_store
from services.store.main import StoreSettings

if TYPE_CHECKING:
    from tests.conftest import ModelRepo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CREDIT = "credit"
PREDICT = "/cyclone.inference.v1.InferenceService/Predict"


class Collector(otlp_grpc.TraceServiceServicer):
    """An OTLP trace receiver keeping (service.name, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    async def Export(
        self, request: otlp_pb.ExportTraceServiceRequest, context: Any
    ) -> otlp_pb.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return otlp_pb.ExportTraceServiceResponse()

    def of(self, service: str) -> list[trace_pb2.Span]:
        return [span for s, span in self.spans if s == service]


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(0)


async def _eventually(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.2)


async def test_a_predict_through_envoy_is_one_trace_stored_with_the_row(
    tmp_path: Path,
    model_repo: ModelRepo,
    fresh_database_url: str,
    collector: tuple[Collector, int],
) -> None:
    receiver, collector_port = collector
    store_settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(store_settings) as store:
        # Its own process: the tracer provider is process-global.
        inference = await asyncio.to_thread(
            spawn,
            "inference",
            ["--model-repository", str(model_repo.root), "--store", store.address],
            tmp_path / "inference.log",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        try:
            rev = Revision(CREDIT, "1", (Endpoint("127.0.0.1", inference.port),))
            settings = EnvoySettings(
                work_dir=tmp_path / "envoy",
                public_host="127.0.0.1",
                public_port=0,
                control_port=0,
                concurrency=1,
                otlp_collector=Endpoint("127.0.0.1", collector_port),
            )
            async with (
                EnvoyProxy(settings) as envoy,
                grpc.aio.insecure_channel(envoy.public_address) as channel,
            ):
                await envoy.apply(TrafficSplit(CREDIT, {rev.name: 100}, {rev.name: rev}))
                rows = model_repo.credit_rows.iloc[:2].to_dict(orient="records")
                response = await pb_grpc.InferenceServiceStub(channel).Predict(
                    build_request(CREDIT, rows), timeout=10
                )
                prediction_id = response.prediction_ids[0]

                async def linked() -> tuple[trace_pb2.Span, trace_pb2.Span] | None:
                    for edge in receiver.of("cyclone-envoy"):
                        for served in receiver.of("cyclone-inference"):
                            if served.name.endswith(PREDICT.lstrip("/")) and (
                                served.trace_id == edge.trace_id
                            ):
                                return edge, served
                    return None

                edge, served = await _eventually(linked)

                async def stored() -> str | None:
                    async with await psycopg.AsyncConnection.connect(fresh_database_url) as db:
                        row = await (
                            await db.execute(
                                "SELECT trace_id FROM predictions WHERE prediction_id = %s::uuid",
                                (prediction_id,),
                            )
                        ).fetchone()
                    return None if row is None else str(row[0])

                row_trace_id = await _eventually(stored, timeout=10)

                # A caller that is itself traced: Envoy continues the caller's trace.
                caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
                await pb_grpc.InferenceServiceStub(channel).Predict(
                    build_request(CREDIT, rows),
                    metadata=(("traceparent", f"00-{caller_trace}-{caller_span}-01"),),
                    timeout=10,
                )

                async def continued() -> tuple[trace_pb2.Span, trace_pb2.Span] | None:
                    edges = [
                        e for e in receiver.of("cyclone-envoy") if e.trace_id.hex() == caller_trace
                    ]
                    served = [
                        s
                        for s in receiver.of("cyclone-inference")
                        if s.trace_id.hex() == caller_trace
                    ]
                    return (edges[0], served[0]) if edges and served else None

                caller_edge, caller_served = await _eventually(continued)
        finally:
            await asyncio.to_thread(inference.stop)

    # Envoy started the trace (no caller context); the server's span is its child.
    assert edge.parent_span_id == b""
    assert edge.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert served.parent_span_id == edge.span_id
    assert served.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert caller_edge.parent_span_id.hex() == caller_span
    assert caller_served.parent_span_id == caller_edge.span_id
    # The inference server logged the prediction with that trace id.
    assert row_trace_id == edge.trace_id.hex()


def test_envoy_tracing_is_off_by_default(tmp_path: Path) -> None:
    from cyclone.envoy import config as cfg

    settings = EnvoySettings(work_dir=tmp_path)
    sources = cfg.rds_sources(cfg.Layout(tmp_path))
    for listener in cfg.listeners(settings, set(), sources):
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert "tracing" not in manager
    assert "static_resources" not in cfg.bootstrap(settings, cfg.Layout(tmp_path))
