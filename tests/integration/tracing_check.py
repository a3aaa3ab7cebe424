"""Run by test_tracing.py in its own process (the tracer provider is process-global).

Serves the model repository given as argv[1] with tracing on, calls Predict, and prints
what the span exporter and the prediction sink saw, as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cyclone import telemetry
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.inference.main import InferenceSettings
from services.launch import start_inference


class CapturingSink:
    def __init__(self) -> None:
        self.trace_ids: list[str] = []

    def submit(
        self, model: Any, ids: Any, job: Any, outputs: Any, latency: Any, trace_id: str
    ) -> None:
        self.trace_ids.append(trace_id)


async def main(repo: Path) -> None:
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"  # never contacted
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing("inference", exporter=exporter)
    sink = CapturingSink()
    server = (await start_inference(InferenceSettings(model_repository=repo, port=0), sink)).server
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.PredictRequest(model="rf")
            for i in range(12):
                request.features[f"f{i}"].numbers.append(0.5)
            await pb_grpc.InferenceServiceStub(channel).Predict(request, timeout=10)
    finally:
        await server.stop(0)
    spans = [
        {"name": s.name, "trace_id": format(s.context.trace_id, "032x")}
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps({"spans": spans, "sink_trace_ids": sink.trace_ids}))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
