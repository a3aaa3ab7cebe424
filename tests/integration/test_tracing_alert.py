"""monitor -> trainer as one trace: the evaluation that raises an alert runs in a span, the
alert keeps its traceparent in the store, and the trainer's Retrain (asked by the alert's
delivery) and the job it queues continue that trace. Monitor and trainer run as `cyclone serve`
processes exporting over OTLP gRPC to a collector run by the test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from cyclone.models.convert import import_pipeline
from cyclone.models.repository import EVALUATION_FILE, REFERENCE_FILE
from cyclone.monitor.v1 import monitor_service_pb2 as mon_pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as mon_grpc
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.telemetry import trace_id_of
from cyclone_app.examples import CREDIT_FEATURES, credit_frame, credit_pipeline
from services.launch import free_port, spawn, start_store
from services.store.db import uuid7
from services.store.main import StoreSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "credit"
# Every prediction says "0": accuracy is below 0.99 (and the predictions are constant), so the
# first evaluation goes RED and asks for a retrain. The retrain then finds too few rows (min_rows) and ends at once.
PLAN = """
model: credit
window: {kind: sliding, duration: 1h, min_labelled_rows: 50}
metrics: [accuracy]
triggers:
  - {metric: accuracy, condition: below, threshold: 0.99, level: RED}
actions: {RED: [retrain]}
retrain: {window: sliding, rows: 100000, min_rows: 100000}
"""
RETRAIN = "/cyclone.trainer.v1.TrainerService/Retrain"
T = TypeVar("T")


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

    def named(self, service: str, name: str) -> list[trace_pb2.Span]:
        return [span for s, span in self.spans if s == service and span.name == name]


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


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.2)


async def register_model(store: store_grpc.StoreServiceStub, repo: Path) -> None:
    frame = credit_frame(1000, seed=0)
    directory, schema, _ = import_pipeline(
        credit_pipeline(frame), MODEL, repo, version="1", sample=frame, label_column="defaulted"
    )
    await store.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=store_pb.ModelVersion(
                model=MODEL,
                version="1",
                task=schema.task,
                sha256=str(schema.extra["sha256"]),
                artifact_uri=str(directory),
                schema_json=json.dumps(schema.to_dict()),
                reference_profile_json=(directory / REFERENCE_FILE).read_text(),
                evaluation_json=(directory / EVALUATION_FILE).read_text(),
            )
        )
    )
    await store.SetModelStatus(
        store_pb.SetModelStatusRequest(
            model=MODEL, version="1", status=store_pb.MODEL_STATUS_SERVING
        )
    )
    await store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=PLAN))


async def send_wrong_predictions(store: store_grpc.StoreServiceStub, rows: int) -> None:
    """Log `rows` served predictions, all "0", and label them with the true classes."""
    frame = credit_frame(rows, seed=3)
    start = datetime.now(UTC) - timedelta(seconds=10)
    ids = [str(uuid7(start + timedelta(milliseconds=i))) for i in range(rows)]
    records = [
        store_pb.PredictionRecord(
            prediction_id=pid,
            model=MODEL,
            version="1",
            input_json=json.dumps({k: row[k] for k in CREDIT_FEATURES}).encode(),
            output_json=json.dumps({"label": "0", "probabilities": {"0": 0.9, "1": 0.1}}).encode(),
        )
        for pid, row in zip(ids, frame.to_dict("records"), strict=True)
    ]

    async def batches() -> AsyncIterator[store_pb.LogPredictionsRequest]:
        yield store_pb.LogPredictionsRequest(records=records)

    await store.LogPredictions(batches())
    await store.AddLabels(
        store_pb.AddLabelsRequest(
            model=MODEL,
            labels=[
                store_pb.Label(prediction_id=pid, text=str(y))
                for pid, y in zip(ids, frame["defaulted"], strict=True)
            ],
        )
    )


async def test_a_retrain_raised_by_an_alert_carries_the_evaluations_trace(
    tmp_path: Path, fresh_database_url: str, collector: tuple[Collector, int]
) -> None:
    receiver, collector_port = collector
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with (
        await start_store(settings) as started,
        aio.insecure_channel(started.address) as store_channel,
    ):
        store = store_grpc.StoreServiceStub(store_channel)
        await register_model(store, tmp_path / "models")
        await send_wrong_predictions(store, 200)
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        common = ["--store", started.address, "--data-dir", str(tmp_path / "data")]
        trainer_port = free_port()
        trainer_args = [*common, "--model-repository", str(tmp_path / "models")]
        monitor_args = [*common, "--trainer", f"127.0.0.1:{trainer_port}"]
        # Both start at once (each imports the ML stack): the dispatcher retries until the
        # trainer answers.
        trainer, monitor = await asyncio.gather(
            asyncio.to_thread(
                spawn, "trainer", trainer_args, tmp_path / "trainer.log", port=trainer_port, env=env
            ),
            asyncio.to_thread(spawn, "monitor", monitor_args, tmp_path / "monitor.log", env=env),
        )
        try:
            async with aio.insecure_channel(monitor.address) as monitor_channel:
                evaluated = await mon_grpc.MonitorServiceStub(monitor_channel).EvaluateNow(
                    mon_pb.EvaluateNowRequest(model=MODEL), timeout=30
                )
            assert mon_pb.Level.Name(evaluated.status.level) == "LEVEL_RED"

            async def job() -> store_pb.TrainingJob | None:
                listed = await store.ListTrainingJobs(
                    store_pb.ListTrainingJobsRequest(model=MODEL), timeout=5
                )
                done = [j for j in listed.jobs if j.state not in ("queued", "running")]
                return done[0] if done else None

            finished = await eventually(job)
            alerts = (
                await store.ListAlerts(store_pb.ListAlertsRequest(model=MODEL), timeout=5)
            ).alerts
            retrain = [a for a in alerts if [t.action for t in a.targets] == ["retrain"]]
            assert len(retrain) == 1 and finished.alert_id == retrain[0].id
            # Every alert of that one evaluation keeps the same trace.
            assert {a.traceparent for a in alerts} == {retrain[0].traceparent}
            trace_id = trace_id_of(retrain[0].traceparent)
            assert trace_id, f"the alert has no traceparent: {retrain[0].traceparent!r}"
            assert finished.state == "not_enough_data", finished.message
            assert finished.message.endswith(f"(trace {trace_id})"), finished.message

            async def spans() -> dict[str, trace_pb2.Span] | None:
                wanted = {
                    "evaluate": ("cyclone-monitor", "monitor.evaluate"),
                    "deliver": ("cyclone-monitor", "monitor.deliver_alert"),
                    "retrain": ("cyclone-trainer", RETRAIN),
                    "job": ("cyclone-trainer", "trainer.job"),
                }
                found = {
                    key: next(
                        (s for s in receiver.named(*where) if s.trace_id.hex() == trace_id), None
                    )
                    for key, where in wanted.items()
                }
                return None if None in found.values() else found  # type: ignore[return-value]

            try:
                found = await eventually(spans, timeout=15)
            except AssertionError:
                seen = [(svc, s.name, s.trace_id.hex()) for svc, s in receiver.spans]
                raise AssertionError(f"trace {trace_id}: spans seen {seen}") from None
        finally:
            await asyncio.gather(
                asyncio.to_thread(trainer.stop, 10), asyncio.to_thread(monitor.stop, 10)
            )
    # One trace, parent to child: evaluation -> delivery -> Retrain (server) -> job.
    deliveries = {
        s.span_id: s
        for s in receiver.named("cyclone-monitor", "monitor.deliver_alert")
        if s.trace_id.hex() == trace_id
    }
    assert found["retrain"].parent_span_id in deliveries
    assert deliveries[found["retrain"].parent_span_id].parent_span_id == found["evaluate"].span_id
    assert found["job"].parent_span_id == found["retrain"].span_id
    stages = [e.name for e in found["job"].events]
    assert "stage fetch" in stages, stages


async def test_a_malformed_traceparent_on_a_new_alert_is_rejected(fresh_database_url: str) -> None:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with (
        await start_store(settings) as started,
        aio.insecure_channel(started.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await store_grpc.StoreServiceStub(channel).RecordEvaluation(
                store_pb.RecordEvaluationRequest(
                    model=MODEL,
                    version="1",
                    level="RED",
                    alerts=[store_pb.AlertRecord(traceparent="00-not-a-trace-01")],
                ),
                timeout=10,
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "alerts[0].traceparent" in (raised.value.details() or "")


def test_traceparent_helpers_accept_only_w3c_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from cyclone import telemetry

    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_id_of(good) == "0af7651916cd43dd8448eb211c80319c"
    for bad in (
        "",
        "00-not-a-trace-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        good.upper(),
        good + "-extra",
    ):
        assert not telemetry.valid_traceparent(bad) and trace_id_of(bad) == ""
    # Tracing off: spans are no-ops and nothing is propagated.
    monkeypatch.setattr(telemetry, "_configured_service", None)
    with telemetry.span("x", parent=good):
        assert telemetry.current_traceparent() == ""
        assert telemetry.traceparent_metadata() == ()
