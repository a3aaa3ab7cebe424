"""The monitor service end to end, in-process: store (fresh database) + inference (credit model
with a reference profile and baseline) + monitor, talking gRPC on free ports.

Predictions go through the real inference server, labels through the store, and every
evaluation through `MonitorService` over the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import yaml
from grpc import aio
from prometheus_client import REGISTRY
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from support import eventually, free_port

from cyclone.client import build_request, predictions_from_response
from cyclone.inference.v1 import inference_service_pb2_grpc as inf_grpc
from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from cyclone.plan import default_plan, parse_plan, plan_to_yaml
from cyclone.server import CycloneServer
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from plugins.alert_sinks import read_recorded
from services import launch
from services.inference.main import InferenceSettings
from services.monitor import dispatcher as dispatcher_module
from services.monitor.dispatcher import AlertDispatcher
from services.monitor.main import MonitorSettings
from services.monitor.monitor import Monitor
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

MODEL = "credit"
FEATURES = ["age", "income", "debt_ratio", "city"]
LEVEL = pb.Level.Name


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The credit model imported with a labelled sample: reference.json + evaluation.json."""
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    root = tmp_path_factory.mktemp("monitor-repo")
    sample = credit_frame(3000, seed=0)
    directory, _, _ = import_pipeline(
        credit_pipeline(sample), MODEL, root, sample=sample, label_column="defaulted"
    )
    assert (directory / "reference.json").exists() and (directory / "evaluation.json").exists()
    return root


async def start_store(database_url: str, port: int = 0) -> CycloneServer:
    settings = StoreSettings(
        port=port, database_url=database_url, log_level="WARNING", pool_min_size=1
    )
    return (await launch.start_store(settings)).server


@dataclass
class Traffic:
    frame: pd.DataFrame
    ids: list[str]
    predicted: list[str]
    probability_of_1: list[float]


@dataclass
class Stack:
    database_url: str
    store_server: CycloneServer
    monitor_server: CycloneServer
    monitor: Monitor
    store: store_grpc.StoreServiceStub
    inference: inf_grpc.InferenceServiceStub
    client: pb_grpc.MonitorServiceStub
    record_path: Path
    version: str = ""
    sent: int = 0
    servers: list[CycloneServer] = field(default_factory=list)

    async def evaluate(self) -> pb.EvaluateNowResponse:
        response: pb.EvaluateNowResponse = await self.client.EvaluateNow(
            pb.EvaluateNowRequest(model=MODEL), timeout=30
        )
        return response

    async def send(self, frame: pd.DataFrame, labels: Sequence[str] | None = None) -> Traffic:
        """Predict `frame` through the inference server; wait until the store has the rows; label."""
        rows = [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in frame[FEATURES].to_dict("records")
        ]
        response = await self.inference.Predict(build_request(MODEL, rows), timeout=30)
        predictions = predictions_from_response(response)
        assert len(predictions) == len(frame)
        self.sent += len(frame)

        async def stored() -> bool:
            stats = await self.store.GetStats(store_pb.GetStatsRequest(model=MODEL), timeout=5)
            return any(m.model == MODEL and m.predictions >= self.sent for m in stats.models)

        await eventually(stored, 15, f"{self.sent} predictions in the store")
        ids = [p.prediction_id for p in predictions]
        if labels is not None:
            got = await self.store.AddLabels(
                store_pb.AddLabelsRequest(
                    model=MODEL,
                    labels=[
                        store_pb.Label(prediction_id=i, text=str(t))
                        for i, t in zip(ids, labels, strict=True)
                    ],
                ),
                timeout=10,
            )
            assert got.stored == len(labels) and not got.unmatched_prediction_ids
        return Traffic(
            frame,
            ids,
            [str(p.label) for p in predictions],
            [float((p.probabilities or {})["1"]) for p in predictions],
        )


@contextlib.asynccontextmanager
async def running_stack(
    repo: Path,
    database_url: str,
    tmp_path: Path,
    *,
    alert_interval: float = 0.2,
    metrics_port: int = -1,
    schedule: bool = False,
    dashboard_port: int = -1,
) -> AsyncIterator[Stack]:
    servers: list[CycloneServer] = []
    channels: list[aio.Channel] = []
    stack: Stack | None = None
    try:
        store_server = await start_store(database_url)
        servers.append(store_server)
        store_address = f"127.0.0.1:{store_server.port}"
        inference_settings = InferenceSettings(
            model_repository=repo,
            port=0,
            store=store_address,
            spool_dir=tmp_path / "spool",
            log_flush_interval=0.05,
            log_level="WARNING",
            data_dir=tmp_path,
        )
        inference_server = (await launch.start_inference(inference_settings)).server
        servers.append(inference_server)
        record_path = tmp_path / "alerts.jsonl"
        started_monitor = await launch.start_monitor(
            MonitorSettings(
                port=0,
                store=store_address,
                alert_record_path=record_path,
                alert_interval=alert_interval,
                log_level="WARNING",
                data_dir=tmp_path,
                metrics_port=metrics_port,
                tick_seconds=0.05,
                dashboard_port=dashboard_port,
            ),
            schedule=schedule,
        )
        monitor_server, monitor = started_monitor.server, started_monitor.domain
        servers.append(monitor_server)
        for port in (store_server.port, inference_server.port, monitor_server.port):
            channels.append(aio.insecure_channel(f"127.0.0.1:{port}"))
        stack = Stack(
            database_url=database_url,
            store_server=store_server,
            monitor_server=monitor_server,
            monitor=monitor,
            store=store_grpc.StoreServiceStub(channels[0]),
            inference=inf_grpc.InferenceServiceStub(channels[1]),
            client=pb_grpc.MonitorServiceStub(channels[2]),
            record_path=record_path,
            servers=servers,
        )

        async def serving() -> bool:
            listed = await stack.store.ListModelVersions(
                store_pb.ListModelVersionsRequest(model=MODEL), timeout=5
            )
            for v in listed.model_versions:
                if v.status == store_pb.MODEL_STATUS_SERVING:
                    stack.version = v.version
                    return True
            return False

        await eventually(serving, 15, "the inference server to register the model as serving")
        yield stack
    finally:
        for channel in channels:
            await channel.close()
        # The list may have been updated (a restarted store): stop what is there, newest first.
        for server in reversed(stack.servers if stack is not None else servers):
            await server.stop(0)


def outbox_claims() -> float:
    """ClaimAlerts calls the in-process store has answered: one per dispatcher tick."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "cyclone_grpc_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("method") == "ClaimAlerts"
    )


async def dispatcher_ticks(count: int) -> None:
    """Wait until the running dispatcher has started `count` more ticks. Ticks run one after
    another, so all but the last of them ran to their end (deliveries written)."""
    target = outbox_claims() + count

    async def ticked() -> bool:
        return outbox_claims() >= target

    await eventually(ticked, 10, f"{count} more dispatcher ticks")


@pytest.fixture
async def stack(repo: Path, fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(repo, fresh_database_url, tmp_path) as s:
        yield s


def healthy(rows: int = 400, seed: int = 1) -> pd.DataFrame:
    from cyclone_app.examples import credit_frame

    return credit_frame(rows, seed=seed)


def shifted(rows: int = 400, seed: int = 2) -> pd.DataFrame:
    from cyclone_app.examples import credit_frame

    return credit_frame(rows, seed=seed, shift=1.0)


def truth(frame: pd.DataFrame) -> list[str]:
    return [str(v) for v in frame["defaulted"]]


def metrics_of(status: pb.ModelStatus) -> dict[str, pb.MetricValue]:
    return {m.name: m for m in status.metrics}


def plan_yaml(**overrides: Any) -> str:
    plan: dict[str, Any] = {
        "model": MODEL,
        "window": {"kind": "sliding", "duration": "1h", "min_labelled_rows": 50},
        "metrics": ["accuracy"],
        "triggers": [
            {"metric": "accuracy", "condition": "below", "threshold": 0.99, "level": "AMBER"}
        ],
        "actions": {"AMBER": ["notify"]},
    }
    plan.update(overrides)
    return yaml.safe_dump(plan, sort_keys=False)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# --- (1) healthy traffic ----------------------------------------------------------------------


async def test_healthy_traffic_is_green_with_metrics_and_no_alerts(stack: Stack) -> None:
    frame = healthy()
    traffic = await stack.send(frame, truth(frame))

    response = await stack.evaluate()
    status = response.status

    assert LEVEL(status.level) == "LEVEL_GREEN", list(status.reasons)
    assert not status.reasons and not status.actions
    assert list(response.alert_ids) == []
    assert status.model == MODEL and status.version == stack.version
    assert status.rows == len(frame) and status.labelled_rows == len(frame)
    assert status.plan_revision == 0
    metrics = metrics_of(status)
    y = np.array(truth(frame))
    accuracy = metrics["accuracy"]
    assert accuracy.status == "ok" and accuracy.HasField("value")
    assert accuracy.value == pytest.approx(accuracy_score(y, traffic.predicted))
    assert metrics["f1_macro"].value == pytest.approx(
        f1_score(y, traffic.predicted, average="macro")
    )
    assert metrics["roc_auc"].value == pytest.approx(
        roc_auc_score(y == "1", traffic.probability_of_1), abs=1e-6
    )
    # Drift ran against the imported reference profile and flagged nothing.
    assert {d.test for d in status.drift} >= {"ks", "psi", "chi_square"}
    assert not [d.feature for d in status.drift if d.drifted]

    alerts = await stack.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)
    assert list(alerts.alerts) == []
    got = await stack.client.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert [s.model for s in got.statuses] == [MODEL]
    assert got.statuses[0].evaluated_at == status.evaluated_at


# --- (2) + (3) drift and a performance dip ------------------------------------------------------


async def test_drift_and_accuracy_dip_go_red_and_alert_exactly_once(stack: Stack) -> None:
    frame = shifted()
    traffic = await stack.send(frame, truth(frame))
    evaluation = json.loads(
        (
            await stack.store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=MODEL), timeout=5
            )
        ).model_version.evaluation_json
    )

    response = await stack.evaluate()
    status = response.status

    assert LEVEL(status.level) == "LEVEL_RED", list(status.reasons)
    accuracy = metrics_of(status)["accuracy"]
    assert accuracy.value == pytest.approx(accuracy_score(truth(frame), traffic.predicted))
    # The dip is real (measured independently) and is what the reason says.
    assert accuracy.value < 0.9 * evaluation["metrics"]["accuracy"]
    accuracy_reasons = [r for r in status.reasons if r.startswith("accuracy")]
    assert accuracy_reasons and "baseline" in accuracy_reasons[0]
    drifted = sorted({d.feature for d in status.drift if d.drifted})
    assert {"income", "debt_ratio"} <= set(drifted)
    drift_reasons = [r for r in status.reasons if "drifted" in r]
    assert len(drift_reasons) == 1 and all(f in drift_reasons[0] for f in drifted)
    assert list(status.actions) == ["retrain", "notify"]

    # One outbox row per (action, sink): default plan has no notify sinks, so both go to `record`.
    alert_ids = list(response.alert_ids)
    assert len(alert_ids) == 2 and len(set(alert_ids)) == 2
    listed = (await stack.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts
    assert sorted(a.id for a in listed) == sorted(alert_ids)
    assert sorted(a.action for a in listed) == ["notify", "retrain"]
    assert {a.sink for a in listed} == {"record"}
    for a in listed:
        assert LEVEL(a.level) == "LEVEL_RED" and a.previous_level == pb.LEVEL_UNSPECIFIED
        assert list(a.reasons) == list(status.reasons)
        assert a.version == stack.version

    # The running dispatcher (interval 0.2 s) delivers both to the record file.
    async def delivered() -> bool:
        return stack.record_path.exists() and len(read_recorded(stack.record_path)) >= 2

    await eventually(delivered, 10, "the dispatcher to write both alerts")
    await dispatcher_ticks(3)  # later ticks ran to their end: nothing may be written twice
    recorded = read_recorded(stack.record_path)
    assert sorted(int(a.id) for a in recorded) == sorted(alert_ids)
    assert sorted(a.actions[0] for a in recorded) == ["notify", "retrain"]
    assert all(a.level == "RED" and a.model == MODEL for a in recorded)

    async def all_delivered() -> bool:
        alerts = (
            await stack.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)
        ).alerts
        return all(a.status == "delivered" for a in alerts)

    await eventually(all_delivered, 5, "alerts marked delivered")

    # Same level again: no new alerts, so no second retraining request.
    again = await stack.evaluate()
    assert LEVEL(again.status.level) == "LEVEL_RED"
    assert list(again.alert_ids) == []
    assert (
        len((await stack.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts)
        == 2
    )
    await dispatcher_ticks(3)
    assert len(read_recorded(stack.record_path)) == 2

    # (3) the history and current health are in the store.
    points = (
        await stack.store.ListMetricPoints(
            store_pb.ListMetricPointsRequest(model=MODEL), timeout=10
        )
    ).points
    by_metric: dict[str, list[store_pb.MetricPoint]] = {}
    for p in points:
        by_metric.setdefault(p.metric, []).append(p)
    assert len(by_metric["level"]) == 2  # one per evaluation
    assert all(p.value == pytest.approx(2.0) and p.level == "RED" for p in by_metric["level"])
    assert [p.value for p in by_metric["accuracy"]] == pytest.approx([accuracy.value] * 2)
    assert all(p.version == stack.version for p in points)
    for feature in drifted:
        drift_points = [
            p
            for m, ps in by_metric.items()
            if m.startswith("drift.") and m.endswith(f".{feature}")
            for p in ps
        ]
        assert any(json.loads(p.details_json)["drifted"] for p in drift_points), feature
    health = (
        await stack.store.GetHealth(store_pb.GetHealthRequest(model=MODEL), timeout=10)
    ).health
    assert [(h.model, h.version, h.level) for h in health] == [(MODEL, stack.version, "RED")]
    assert json.loads(health[0].reasons_json) == list(again.status.reasons)
    summary = json.loads(health[0].summary_json)
    assert summary["rows"] == len(frame) and summary["labelled_rows"] == len(frame)


# --- (4) WatchStatus ----------------------------------------------------------------------------


async def test_watch_status_yields_current_status_then_the_next_evaluation(stack: Stack) -> None:
    frame = healthy()
    await stack.send(frame, truth(frame))
    first = (await stack.evaluate()).status

    call = stack.client.WatchStatus(pb.WatchStatusRequest(model=MODEL), timeout=30)
    try:
        current = await asyncio.wait_for(call.read(), 10)
        assert current.status == first
        # The shifted traffic changes the next evaluation; the stream must carry that one.
        more = shifted(200)
        await stack.send(more, truth(more))
        second = (await stack.evaluate()).status
        nxt = await asyncio.wait_for(call.read(), 10)
        assert nxt.status == second
        assert nxt.status.rows == len(frame) + len(more)
        assert nxt.status.evaluated_at.ToDatetime() > first.evaluated_at.ToDatetime()
    finally:
        call.cancel()

    # A filter on another model: the current status of credit is not sent.
    other = stack.client.WatchStatus(pb.WatchStatusRequest(model="nope"), timeout=30)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(other.read(), 0.3)
    finally:
        other.cancel()


# --- (5) plans --------------------------------------------------------------------------------


async def test_plans_default_custom_and_rejected(stack: Stack) -> None:
    got = await stack.client.GetPlan(pb.GetPlanRequest(model=MODEL), timeout=10)
    assert got.revision == 0
    assert parse_plan(got.plan_yaml) == default_plan(MODEL, "classification")
    assert got.plan_yaml == plan_to_yaml(default_plan(MODEL, "classification"))

    frame = healthy(300)
    await stack.send(frame, truth(frame))
    before = (await stack.evaluate()).status
    assert LEVEL(before.level) == "LEVEL_GREEN" and before.plan_revision == 0
    assert metrics_of(before)["accuracy"].value < 0.99  # the custom trigger below must fire

    custom = plan_yaml()
    saved = await stack.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=custom), timeout=10)
    assert saved.revision == 1
    got = await stack.client.GetPlan(pb.GetPlanRequest(model=MODEL), timeout=10)
    assert (got.revision, got.plan_yaml) == (1, custom)

    after = await stack.evaluate()
    assert LEVEL(after.status.level) == "LEVEL_AMBER"
    assert after.status.plan_revision == 1
    assert [m.name for m in after.status.metrics] == ["accuracy"]
    assert list(after.status.drift) == []
    assert len(after.status.reasons) == 1 and after.status.reasons[0].startswith("accuracy")
    assert "below 0.99" in after.status.reasons[0]
    assert list(after.status.actions) == ["notify"]
    assert len(after.alert_ids) == 1

    bad = {
        "unknown metric": (
            plan_yaml(metrics=["accuracy", "no_such_metric"]),
            "metrics[1]: unknown metric 'no_such_metric'",
        ),
        "threshold type": (
            plan_yaml(
                triggers=[
                    {
                        "metric": "accuracy",
                        "condition": "below",
                        "threshold": "high",
                        "level": "AMBER",
                    }
                ]
            ),
            "triggers[0].threshold: expected a number, got 'high'",
        ),
        "zero duration": (
            plan_yaml(window={"kind": "sliding", "duration": "0s"}),
            "window.duration: must be greater than zero",
        ),
        "zero rows": (
            plan_yaml(window={"kind": "sliding", "rows": 0}),
            "window.rows: must be at least 1",
        ),
        "another model": (plan_yaml(model="churn"), "model: the plan is for 'churn', not 'credit'"),
        "a regression metric on a classifier": (
            plan_yaml(
                metrics=["accuracy", "rmse"],
                triggers=[{"metric": "rmse", "condition": "above", "threshold": 1, "level": "RED"}],
            ),
            "metrics[1]: 'rmse' is a regression metric and credit model is a classification model",
        ),
        "not yaml": ("model: [unclosed", "<yaml>"),
    }
    for case, (text, expected) in bad.items():
        error = await rpc_error(
            stack.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=text), timeout=10)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert error.details().startswith("plan_yaml: "), (case, error.details())
        assert expected in error.details(), (case, error.details())
    error = await rpc_error(
        stack.client.SetPlan(pb.SetPlanRequest(model="", plan_yaml=custom), timeout=10)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("model")

    # Nothing rejected was stored.
    got = await stack.client.GetPlan(pb.GetPlanRequest(model=MODEL), timeout=10)
    assert (got.revision, got.plan_yaml) == (1, custom)
    error = await rpc_error(stack.client.GetPlan(pb.GetPlanRequest(model="nope"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope' is not registered; registered models: credit" in error.details()
    # Alerts filtered by a model nobody registered: the same answer, not an empty list.
    error = await rpc_error(stack.client.ListAlerts(pb.ListAlertsRequest(model="nope"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope' is not registered; registered models: credit" in error.details()


# --- (6) not enough data ------------------------------------------------------------------------


async def test_unlabelled_window_has_no_quality_values_and_level_from_the_rest(
    stack: Stack,
) -> None:
    frame = shifted(300)
    traffic = await stack.send(frame)  # no labels

    status = (await stack.evaluate()).status

    assert status.rows == len(frame) and status.labelled_rows == 0
    metrics = metrics_of(status)
    for name in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        assert metrics[name].status == "not_enough_data", name
        assert not metrics[name].HasField("value"), name
        assert metrics[name].detail, name
    assert metrics["invalid_probability_rate"].status == "ok"
    # Operational metrics from the latency the inference server logged with every row.
    p50, p99 = metrics["latency_p50_ms"], metrics["latency_p99_ms"]
    assert p50.status == p99.status == "ok" and 0 < p50.value <= p99.value, (p50, p99)
    assert metrics["throughput_rps"].status == "ok" and metrics["throughput_rps"].value > 0
    # Quality is estimated from the probabilities until labels arrive; the shift lowers it.
    estimated = metrics["estimated_accuracy"]
    assert estimated.status == "ok" and "95% band" in estimated.detail
    # The example's shift also changes the rule itself (concept shift), which only labels
    # reveal: the estimate sees the covariate part of the drop, not all of it.
    realized = accuracy_score(truth(frame), traffic.predicted)
    assert realized + 0.05 < estimated.value < 0.7
    assert LEVEL(status.level) == "LEVEL_RED", list(status.reasons)
    assert any(r.startswith("estimated_accuracy") for r in status.reasons)
    assert any("drifted" in r for r in status.reasons)

    points = (
        await stack.store.ListMetricPoints(
            store_pb.ListMetricPointsRequest(model=MODEL, metric="accuracy"), timeout=10
        )
    ).points
    assert len(points) == 1 and not points[0].HasField("value")
    assert json.loads(points[0].details_json)["status"] == "not_enough_data"


async def test_single_class_labels_make_roc_auc_not_enough_data(stack: Stack) -> None:
    frame = healthy(300)
    traffic = await stack.send(frame, ["0"] * len(frame))

    status = (await stack.evaluate()).status

    metrics = metrics_of(status)
    assert metrics["roc_auc"].status == "not_enough_data" and not metrics["roc_auc"].HasField(
        "value"
    )
    assert "single class" in metrics["roc_auc"].detail
    assert metrics["accuracy"].value == pytest.approx(
        accuracy_score(["0"] * len(frame), traffic.predicted)
    )
    assert metrics["log_loss"].status == "ok"


# --- (7) a sink that is down ------------------------------------------------------------------


class Hook:
    """A webhook receiver that is started on demand on a fixed port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


async def test_webhook_down_then_up_is_retried_and_delivered_once(
    repo: Path, fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retry at once instead of after 2**attempts seconds; the backoff itself is unit-tested.
    monkeypatch.setattr(dispatcher_module, "backoff_seconds", lambda attempts, cap=300.0: 0.0)
    hook = Hook(free_port())
    # A long interval keeps the server's own dispatcher out of the way: this test drives one.
    async with running_stack(repo, fresh_database_url, tmp_path, alert_interval=3600) as s:
        try:
            url = f"http://127.0.0.1:{hook.port}/hook"
            plan = plan_yaml(
                triggers=[
                    {"metric": "accuracy", "condition": "below", "threshold": 0.99, "level": "RED"}
                ],
                actions={"RED": ["notify"]},
                notify=[{"sink": "webhook", "config": {"url": url, "timeout": 2}}],
            )
            await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
            frame = healthy(200)
            await s.send(frame, truth(frame))
            response = await s.evaluate()
            assert LEVEL(response.status.level) == "LEVEL_RED"
            assert len(response.alert_ids) == 1
            alert_id = response.alert_ids[0]
            dispatcher = AlertDispatcher(s.monitor.store)

            async def alert() -> pb.Alert:
                alerts = (
                    await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)
                ).alerts
                assert [a.id for a in alerts] == [alert_id]
                found: pb.Alert = alerts[0]
                return found

            first = await alert()
            assert (first.status, first.attempts, first.sink, first.action) == (
                "pending",
                0,
                "webhook",
                "notify",
            )

            assert await dispatcher.dispatch_once() == 0
            failed = await alert()
            assert failed.status == "failed" and failed.attempts == 1
            assert (
                failed.last_error.startswith("webhook: ") and "refused" in failed.last_error.lower()
            )
            assert await dispatcher.dispatch_once() == 0
            assert (await alert()).attempts == 2
            failed_only = await s.client.ListAlerts(
                pb.ListAlertsRequest(model=MODEL, status="failed"), timeout=10
            )
            assert [a.id for a in failed_only.alerts] == [alert_id]

            hook.start()
            assert await dispatcher.dispatch_once() == 1
            assert await dispatcher.dispatch_once() == 0
            delivered = await alert()
            # The successful delivery is the third attempt; its error is cleared.
            assert (delivered.status, delivered.attempts, delivered.last_error) == (
                "delivered",
                3,
                "",
            )
            assert len(hook.bodies) == 1
            assert hook.bodies[0]["id"] == str(alert_id)
            assert hook.bodies[0]["model"] == MODEL and hook.bodies[0]["level"] == "RED"

            acked = await s.client.AcknowledgeAlert(
                pb.AcknowledgeAlertRequest(alert_id=alert_id), timeout=10
            )
            assert acked.alert.id == alert_id and acked.alert.status == "acknowledged"
            assert (await alert()).status == "acknowledged"
            assert await dispatcher.dispatch_once() == 0
            assert len(hook.bodies) == 1

            error = await rpc_error(
                s.client.AcknowledgeAlert(
                    pb.AcknowledgeAlertRequest(alert_id=alert_id + 1000), timeout=10
                )
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert str(alert_id + 1000) in error.details()
            error = await rpc_error(
                s.client.AcknowledgeAlert(pb.AcknowledgeAlertRequest(alert_id=0), timeout=10)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            hook.stop()


async def test_acknowledged_failing_alert_is_not_retried(
    repo: Path, fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "backoff_seconds", lambda attempts, cap=300.0: 0.0)
    hook = Hook(free_port())
    async with running_stack(repo, fresh_database_url, tmp_path, alert_interval=3600) as s:
        try:
            plan = plan_yaml(
                notify=[
                    {
                        "sink": "webhook",
                        "config": {"url": f"http://127.0.0.1:{hook.port}/h", "timeout": 2},
                    }
                ]
            )
            await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
            frame = healthy(100)
            await s.send(frame, truth(frame))
            (alert_id,) = (await s.evaluate()).alert_ids
            dispatcher = AlertDispatcher(s.monitor.store)
            assert await dispatcher.dispatch_once() == 0
            await s.client.AcknowledgeAlert(
                pb.AcknowledgeAlertRequest(alert_id=alert_id), timeout=10
            )
            hook.start()
            assert await dispatcher.dispatch_once() == 0
            assert hook.bodies == []
            (a,) = (await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts
            assert (a.status, a.attempts) == ("acknowledged", 1)
        finally:
            hook.stop()


# --- (8) bad input and a store that is down -----------------------------------------------------


async def test_bad_requests_and_store_outage(stack: Stack) -> None:
    error = await rpc_error(
        stack.client.EvaluateNow(pb.EvaluateNowRequest(model="nope"), timeout=10)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.details()
    error = await rpc_error(stack.client.EvaluateNow(pb.EvaluateNowRequest(model=""), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("model")
    error = await rpc_error(
        stack.client.ListAlerts(pb.ListAlertsRequest(status="bogus"), timeout=10)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "status" in error.details()

    frame = healthy(200)
    await stack.send(frame, truth(frame))
    before = (await stack.evaluate()).status

    port = stack.store_server.port
    await stack.store_server.stop(0)
    stack.servers.remove(stack.store_server)

    for call in (
        stack.client.EvaluateNow(pb.EvaluateNowRequest(model=MODEL), timeout=10),
        stack.client.ListAlerts(pb.ListAlertsRequest(), timeout=10),
        stack.client.GetPlan(pb.GetPlanRequest(model=MODEL), timeout=10),
        stack.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan_yaml()), timeout=10),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error.details().startswith("store"), error.details()
    # Still serving what it has.
    got = await stack.client.GetStatus(pb.GetStatusRequest(model=MODEL), timeout=10)
    assert list(got.statuses) == [before]

    # The store comes back on the same address: the monitor recovers without a restart.
    restarted = await start_store(stack.database_url, port)
    stack.servers.insert(0, restarted)
    stack.store_server = restarted
    result: list[pb.EvaluateNowResponse] = []

    async def evaluates() -> bool:
        try:
            result.append(await stack.evaluate())
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            return False
        return True

    await eventually(evaluates, 20, "the monitor to reach the restarted store")
    assert result[-1].status.rows == len(frame)
    assert result[-1].status.level == before.level


# --- (9) Prometheus -----------------------------------------------------------------------------


async def test_metrics_endpoint_exposes_health_level(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    async with running_stack(repo, fresh_database_url, tmp_path, metrics_port=0) as s:
        frame = shifted(200)
        await s.send(frame)  # unlabelled + shifted: RED (estimated accuracy drops, drift)
        status = (await s.evaluate()).status
        assert s.monitor_server.metrics_port > 0

        def scrape() -> str:
            url = f"http://127.0.0.1:{s.monitor_server.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(scrape)
        line = f'cyclone_model_health_level{{model="{MODEL}",version="{s.version}"}}'
        values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
        assert values == [float(status.level - 1)]
        assert LEVEL(status.level) == "LEVEL_RED"
        drifted = len({d.feature for d in status.drift if d.drifted})
        line = f'cyclone_model_drifted_features{{model="{MODEL}",version="{s.version}"}}'
        assert [float(r.split()[-1]) for r in text.splitlines() if r.startswith(line)] == [
            float(drifted)
        ]


async def test_dashboard_serves_the_page_status_and_alerts(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    async with running_stack(repo, fresh_database_url, tmp_path, dashboard_port=0) as s:
        dashboard = s.monitor.dashboard
        assert dashboard is not None and dashboard.port > 0
        base = f"http://127.0.0.1:{dashboard.port}"

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        code, page = await asyncio.to_thread(get, "/")
        assert code == 200 and "Cyclone" in page and "static/dashboard.js" in page
        code, script = await asyncio.to_thread(get, "/static/dashboard.js")
        assert code == 200 and "api/events" in script
        code, body = await asyncio.to_thread(get, "/api/status")
        assert (code, json.loads(body)) == (200, [])  # nothing evaluated yet

        frame = shifted(300)
        await s.send(frame, labels=frame["defaulted"].astype(str).tolist())
        status = (await s.evaluate()).status
        code, body = await asyncio.to_thread(get, "/api/status")
        shown = json.loads(body)
        assert code == 200 and [m["model"] for m in shown] == [MODEL]
        assert shown[0]["level"] == LEVEL(status.level)
        assert shown[0]["rows"] == str(status.rows)  # int64 travels as a JSON string

        async def alerts() -> list[dict[str, Any]]:
            code, body = await asyncio.to_thread(get, "/api/alerts")
            assert code == 200
            listed: list[dict[str, Any]] = json.loads(body)
            return listed

        listed = await alerts()
        assert listed and {a["model"] for a in listed} == {MODEL}
        code, _ = await asyncio.to_thread(get, "/nope")
        assert code == 404


# --- tiny windows and window kinds --------------------------------------------------------------


async def test_empty_and_one_row_windows_evaluate(stack: Stack) -> None:
    empty = (await stack.evaluate()).status
    assert (empty.rows, empty.labelled_rows) == (0, 0)
    assert LEVEL(empty.level) == "LEVEL_GREEN"
    assert metrics_of(empty)["accuracy"].status == "not_enough_data"

    # One row: the drift tests are skipped (NaN statistics), which must not break recording.
    await stack.send(healthy(1))
    one = (await stack.evaluate()).status
    assert one.rows == 1
    assert LEVEL(one.level) == "LEVEL_GREEN"
    skipped = [d for d in one.drift if d.test == "ks"]
    assert skipped and not any(d.drifted for d in skipped)
    points = (
        await stack.store.ListMetricPoints(
            store_pb.ListMetricPointsRequest(model=MODEL), timeout=10
        )
    ).points
    ks = [p for p in points if p.metric.startswith("drift.ks.")]
    assert ks and all(not p.HasField("value") for p in ks)
    assert all(json.loads(p.details_json)["statistic"] is None for p in ks)


async def test_store_rejects_non_json_numbers_in_evaluations(stack: Stack) -> None:
    request = store_pb.RecordEvaluationRequest(
        model=MODEL,
        version=stack.version,
        level="GREEN",
        points=[store_pb.MetricPoint(metric="drift.ks.age", details_json='{"statistic": NaN}')],
    )
    error = await rpc_error(stack.store.RecordEvaluation(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("points[0].details_json: ") and "NaN" in error.details()


async def test_row_window_counts_unlabelled_rows_too(stack: Stack) -> None:
    labelled = healthy(150)
    await stack.send(labelled, truth(labelled))
    await stack.send(healthy(100, seed=3))  # newer, unlabelled
    plan = plan_yaml(window={"kind": "sliding", "rows": 120, "min_labelled_rows": 10})
    await stack.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)

    status = (await stack.evaluate()).status

    assert (status.rows, status.labelled_rows) == (120, 20)


async def test_expanding_window_takes_everything_since_registration(stack: Stack) -> None:
    frame = healthy(150)
    await stack.send(frame, truth(frame))
    plan = plan_yaml(window={"kind": "expanding", "min_labelled_rows": 10})
    await stack.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)

    status = (await stack.evaluate()).status

    assert (status.rows, status.labelled_rows) == (150, 150)


async def test_one_alert_per_action_and_sink_each_delivered_on_its_own(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.jsonl"
    dead_url = f"http://127.0.0.1:{free_port()}/hook"
    async with running_stack(repo, fresh_database_url, tmp_path) as s:
        plan = plan_yaml(
            triggers=[
                {"metric": "accuracy", "condition": "below", "threshold": 0.99, "level": "RED"}
            ],
            actions={"RED": ["retrain", "notify"]},
            notify=[
                {"sink": "record", "config": {"path": str(notify_path)}},
                {"sink": "webhook", "config": {"url": dead_url, "timeout": 2}},
            ],
        )
        await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
        frame = healthy(100)
        await s.send(frame, truth(frame))
        response = await s.evaluate()
        assert len(response.alert_ids) == 3

        async def settled() -> bool:
            alerts = (
                await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)
            ).alerts
            return all(a.status != "pending" for a in alerts)

        await eventually(settled, 10, "every alert to be tried")
        alerts = (await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts
        got = sorted((a.action, a.sink, a.status) for a in alerts)
        assert got == [
            ("notify", "record", "delivered"),
            ("notify", "webhook", "failed"),
            ("retrain", "record", "delivered"),
        ]
        # retrain goes to the monitor's record file, notify to the plan's sink.
        assert [a.actions for a in read_recorded(s.record_path)] == [["retrain"]]
        assert [a.actions for a in read_recorded(notify_path)] == [["notify"]]


async def test_acknowledging_an_alert_in_flight_stops_its_retries(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/hook"
    async with running_stack(repo, fresh_database_url, tmp_path, alert_interval=3600) as s:
        plan = plan_yaml(notify=[{"sink": "webhook", "config": {"url": dead_url, "timeout": 2}}])
        await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
        frame = healthy(100)
        await s.send(frame, truth(frame))
        (alert_id,) = (await s.evaluate()).alert_ids
        # What a dispatcher does, with the operator's acknowledgement landing mid-delivery.
        claimed = await s.store.ClaimAlerts(
            store_pb.ClaimAlertsRequest(limit=10, lease_seconds=60), timeout=10
        )
        assert [a.id for a in claimed.alerts] == [alert_id]
        await s.client.AcknowledgeAlert(pb.AcknowledgeAlertRequest(alert_id=alert_id), timeout=10)
        retry = store_pb.CompleteAlertRequest(
            alert_id=alert_id, delivered=False, error="webhook: down"
        )
        retry.next_attempt_at.GetCurrentTime()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await s.store.CompleteAlert(retry, timeout=10)
        (alert,) = (await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts
        assert alert.status == "acknowledged"
        again = await s.store.ClaimAlerts(
            store_pb.ClaimAlertsRequest(limit=10, lease_seconds=60), timeout=10
        )
        assert list(again.alerts) == []


async def test_alert_is_dead_after_max_attempts(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/hook"
    async with running_stack(repo, fresh_database_url, tmp_path, alert_interval=3600) as s:
        plan = plan_yaml(notify=[{"sink": "webhook", "config": {"url": dead_url, "timeout": 2}}])
        await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
        frame = healthy(100)
        await s.send(frame, truth(frame))
        (alert_id,) = (await s.evaluate()).alert_ids
        dispatcher = AlertDispatcher(s.monitor.store, max_attempts=1)
        assert await dispatcher.dispatch_once() == 0
        (alert,) = (await s.client.ListAlerts(pb.ListAlertsRequest(model=MODEL), timeout=10)).alerts
        assert (alert.id, alert.status, alert.attempts) == (alert_id, "dead", 1)
        claimed = await s.store.ClaimAlerts(store_pb.ClaimAlertsRequest(limit=10), timeout=10)
        assert list(claimed.alerts) == []


async def test_schedule_evaluates_serving_models_on_its_own(
    repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    async with running_stack(repo, fresh_database_url, tmp_path, schedule=True) as s:
        # The first run may already have seen the model with an empty window (next due in 1m).
        frame = healthy(100)
        await s.send(frame, truth(frame))
        # A new plan makes the model due at once; it runs every second from then on.
        plan = plan_yaml(schedule={"every": "1s"})
        await s.client.SetPlan(pb.SetPlanRequest(model=MODEL, plan_yaml=plan), timeout=10)
        seen: list[pb.ModelStatus] = []

        async def evaluated(count: int) -> bool:
            got = await s.client.GetStatus(pb.GetStatusRequest(model=MODEL), timeout=10)
            for status in got.statuses:
                if status.plan_revision == 1 and (
                    not seen or status.evaluated_at != seen[-1].evaluated_at
                ):
                    seen.append(status)
            return len(seen) >= count

        await eventually(lambda: evaluated(1), 10, "the schedule to evaluate with the new plan")
        assert (seen[0].model, seen[0].rows, seen[0].labelled_rows) == (MODEL, 100, 100)
        await eventually(lambda: evaluated(2), 10, "the next scheduled evaluation")
        gap = seen[1].evaluated_at.ToDatetime() - seen[0].evaluated_at.ToDatetime()
        assert gap.total_seconds() >= 0.9  # every 1s, not every 0.05s tick


async def test_stored_plan_that_no_longer_parses_falls_back_to_the_default(stack: Stack) -> None:
    # As if a plugin whose metric the plan used was uninstalled after SetPlan validated it.
    stale = plan_yaml(metrics=["accuracy", "gone_metric"])
    saved = await stack.store.SavePlan(
        store_pb.SavePlanRequest(model=MODEL, plan_yaml=stale), timeout=10
    )
    assert saved.revision == 1
    got = await stack.client.GetPlan(pb.GetPlanRequest(model=MODEL), timeout=10)
    assert got.revision == 0
    assert got.plan_yaml == plan_to_yaml(default_plan(MODEL, "classification"))
    status = (await stack.evaluate()).status
    assert status.plan_revision == 0
    assert "roc_auc" in {m.name for m in status.metrics}
