"""The monitor's pure parts and its protobuf edge: store chunks → Window, Evaluation →
ModelStatus → metric points, alert targets, and the dispatcher's backoff."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from cyclone.monitor.v1 import monitor_service_pb2 as pb
from cyclone.plan import Plan, SinkRef
from cyclone.plugin_api import DriftResult, Level, MetricResult, Window
from cyclone.store.v1 import store_service_pb2 as store_pb
from services.monitor import convert
from services.monitor.dispatcher import backoff_seconds
from services.monitor.evaluate import Evaluation
from services.monitor.monitor import Monitor, metric_points, status_from_evaluation
from services.monitor.records import AlertTarget
from services.monitor.window import window_from_chunks as window_from_domain_chunks

AT = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def chunk(**kwargs: object) -> store_pb.GetTrainingDataResponse:
    return store_pb.GetTrainingDataResponse(**kwargs)  # type: ignore[arg-type]


def window_from_chunks(chunks: list[store_pb.GetTrainingDataResponse], task: str) -> Window:
    """Through the edge (store message → domain chunk) into window building."""
    return window_from_domain_chunks(
        [convert.window_chunk_from_store(c, task) for c in chunks], task
    )


def status_to_pb(ev: Evaluation, model: str, version: str, revision: int) -> pb.ModelStatus:
    return convert.status_to_pb(status_from_evaluation(model, version, ev, revision, AT))


def store_points(ev: Evaluation) -> list[store_pb.MetricPoint]:
    status = status_from_evaluation("credit", "3", ev, 0, AT)
    return [convert.point_to_store(p) for p in metric_points(status)]


# --- window_from_chunks -----------------------------------------------------------------------


def regression_chunks() -> list[store_pb.GetTrainingDataResponse]:
    return [
        chunk(
            features={
                "x": store_pb.Column(numbers=[1.0, math.nan]),
                "city": store_pb.Column(strings=["lisbon", "porto"]),
            },
            predictions=store_pb.Column(numbers=[10.0, 20.0]),
            labels=store_pb.Column(numbers=[11.0, 0.0]),  # the second is a placeholder
            labelled=[True, False],
        ),
        chunk(
            features={
                "x": store_pb.Column(numbers=[3.0]),
                "city": store_pb.Column(strings=[""]),
            },
            predictions=store_pb.Column(numbers=[30.0]),
            labels=store_pb.Column(numbers=[29.5]),
            labelled=[True],
        ),
    ]


def test_regression_window_concatenates_chunks_and_blanks_unlabelled_rows() -> None:
    w = window_from_chunks(regression_chunks(), "regression")

    assert w.task == "regression" and w.n_rows == 3
    assert w.predictions.dtype == np.float64
    np.testing.assert_array_equal(w.predictions, [10.0, 20.0, 30.0])
    assert w.labels is not None and w.labels.dtype == np.float64
    np.testing.assert_array_equal(w.labels, [11.0, np.nan, 29.5])
    assert w.n_labelled == 2
    np.testing.assert_array_equal(w.labelled_mask, [True, False, True])
    # Numeric columns are float (NaN kept), text columns are object arrays.
    assert w.features["x"].dtype == np.float64
    np.testing.assert_array_equal(w.features["x"], [1.0, np.nan, 3.0])
    assert w.features["city"].dtype == object
    assert list(w.features["city"]) == ["lisbon", "porto", ""]
    assert w.probabilities is None


def test_regression_window_with_no_labels_at_all() -> None:
    w = window_from_chunks(
        [
            chunk(
                predictions=store_pb.Column(numbers=[1.0, 2.0]),
                labels=store_pb.Column(numbers=[0.0, 0.0]),
                labelled=[False, False],
            )
        ],
        "regression",
    )
    assert w.n_labelled == 0
    assert w.labels is not None and bool(np.isnan(w.labels).all())


def classification_chunks() -> list[store_pb.GetTrainingDataResponse]:
    return [
        chunk(
            features={"age": store_pb.Column(numbers=[30.0, 40.0])},
            predictions=store_pb.Column(strings=["0", "1"]),
            labels=store_pb.Column(strings=["0", ""]),
            class_labels=["0", "1"],
            probabilities=[0.8, 0.2, 0.3, 0.7],
            labelled=[True, False],
        ),
        chunk(
            features={"age": store_pb.Column(numbers=[50.0])},
            predictions=store_pb.Column(strings=["1"]),
            labels=store_pb.Column(strings=["0"]),
            class_labels=["0", "1"],
            probabilities=[0.4, 0.6],
            labelled=[True],
        ),
    ]


def test_classification_window_reshapes_probabilities_and_uses_none_for_unlabelled() -> None:
    w = window_from_chunks(classification_chunks(), "classification")

    assert w.task == "classification" and w.n_rows == 3
    assert w.class_labels == ["0", "1"]
    assert w.probabilities is not None and w.probabilities.shape == (3, 2)
    np.testing.assert_allclose(w.probabilities, [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert w.labels is not None and list(w.labels) == ["0", None, "0"]
    assert list(w.predictions) == ["0", "1", "1"]
    assert w.n_labelled == 2
    np.testing.assert_array_equal(w.label_codes, [0, -1, 0])
    np.testing.assert_array_equal(w.labelled.prediction_codes, [0, 1])


def test_classification_window_without_probabilities() -> None:
    w = window_from_chunks(
        [
            chunk(
                predictions=store_pb.Column(strings=["a", "b"]),
                labels=store_pb.Column(strings=["a", "a"]),
                labelled=[True, True],
            )
        ],
        "classification",
    )
    assert w.probabilities is None
    assert w.n_labelled == 0  # no class labels known: no label can be encoded


def test_empty_window() -> None:
    for task in ("classification", "regression"):
        w = window_from_chunks([], task)
        assert (w.n_rows, w.n_labelled, w.features) == (0, 0, {})
        assert w.task == task


# --- status_from_evaluation / metric_points -----------------------------------------------------


def evaluation() -> Evaluation:
    return Evaluation(
        level=Level.RED,
        reasons=("accuracy = 0.5 is below 0.9", "1 features drifted (any): age"),
        actions=("retrain", "notify"),
        metrics={
            "accuracy": MetricResult.ok(0.5),
            "roc_auc": MetricResult.not_enough_data("labelled rows contain a single class"),
            "broken": MetricResult.error("plugin 'x' raised ValueError: no"),
        },
        drift={
            "ks": {
                "age": DriftResult(0.4, 0.001, 0.4, True, 0.1),
                "income": DriftResult.skipped(
                    "not_enough_data", "fewer than 2 current values", 0.1
                ),
            },
            "psi": {"age": DriftResult(0.3, None, 0.3, True, 0.2)},
        },
        drifted={"ks": ("age",), "psi": ("age",), "any": ("age",)},
        notes=("drift skipped for city: not in both window and reference",),
        n_rows=500,
        n_labelled=200,
    )


def test_status_from_evaluation_copies_everything() -> None:
    ev = evaluation()
    status = status_to_pb(ev, "credit", "3", 2)

    assert (status.model, status.version, status.level) == ("credit", "3", pb.LEVEL_RED)
    assert list(status.reasons) == list(ev.reasons) and list(status.actions) == [
        "retrain",
        "notify",
    ]
    assert (status.rows, status.labelled_rows, status.plan_revision) == (500, 200, 2)
    assert list(status.notes) == list(ev.notes)
    assert status.evaluated_at.ToDatetime(tzinfo=UTC) == AT
    metrics = {m.name: m for m in status.metrics}
    assert metrics["accuracy"].HasField("value") and metrics["accuracy"].value == 0.5
    assert metrics["accuracy"].status == "ok"
    for name in ("roc_auc", "broken"):
        assert not metrics[name].HasField("value")
        assert metrics[name].status == ev.metrics[name].status
        assert metrics[name].detail == ev.metrics[name].detail
    drift = {(d.test, d.feature): d for d in status.drift}
    assert set(drift) == {("ks", "age"), ("ks", "income"), ("psi", "age")}
    assert drift["ks", "age"].p_value == pytest.approx(0.001) and drift["ks", "age"].drifted
    assert not drift["psi", "age"].HasField("p_value")
    assert not drift["ks", "income"].drifted and math.isnan(drift["ks", "income"].effect_size)


@pytest.mark.parametrize(
    ("level", "expected"), [(Level.GREEN, 0.0), (Level.AMBER, 1.0), (Level.RED, 2.0)]
)
def test_level_point_is_zero_green_to_two_red(level: Level, expected: float) -> None:
    ev = Evaluation(level=level, reasons=(), actions=(), metrics={})
    points = store_points(ev)
    assert [(p.metric, p.value) for p in points] == [("level", expected)]


def test_metric_points_one_per_metric_drift_result_and_level() -> None:
    points = {p.metric: p for p in store_points(evaluation())}

    assert set(points) == {
        "accuracy",
        "roc_auc",
        "broken",
        "drift.ks.age",
        "drift.ks.income",
        "drift.psi.age",
        "level",
    }
    assert all(p.created_at.ToDatetime(tzinfo=UTC) == AT for p in points.values())
    assert points["accuracy"].value == 0.5 and points["accuracy"].details_json == ""
    # No value is stored as "no value" (never NaN), with why in the details.
    assert not points["roc_auc"].HasField("value")
    assert json.loads(points["roc_auc"].details_json) == {
        "status": "not_enough_data",
        "detail": "labelled rows contain a single class",
    }
    assert json.loads(points["broken"].details_json)["status"] == "error"
    assert points["drift.ks.age"].value == pytest.approx(0.4)
    assert json.loads(points["drift.ks.age"].details_json) == {
        "statistic": 0.4,
        "drifted": True,
        "threshold": 0.1,
    }
    assert points["level"].value == 2.0


def test_skipped_drift_points_are_valid_json_without_nan() -> None:
    point = {p.metric: p for p in store_points(evaluation())}["drift.ks.income"]

    assert not point.HasField("value")

    def reject(name: str) -> None:
        raise AssertionError(f"{name} in details_json")

    details = json.loads(point.details_json, parse_constant=reject)
    assert details == {"statistic": None, "drifted": False, "threshold": 0.1}


# --- alert targets ------------------------------------------------------------------------------


def test_alerts_one_per_action_and_sink(tmp_path: Path) -> None:
    monitor = Monitor("127.0.0.1:1", record_path=tmp_path / "alerts.jsonl")
    ev = evaluation()
    plan = Plan(
        model="credit",
        notify=(SinkRef("webhook", {"url": "http://h"}), SinkRef("slack", {"url": "http://s"})),
    )

    targets = monitor._alerts_for(plan, ev)

    assert targets == [
        AlertTarget("retrain", "record", {"path": str(tmp_path / "alerts.jsonl")}),
        AlertTarget("notify", "webhook", {"url": "http://h"}),
        AlertTarget("notify", "slack", {"url": "http://s"}),
    ]
    # Without notify sinks, notify is recorded too; no actions, no alerts.
    assert [t.sink for t in monitor._alerts_for(Plan(model="credit"), ev)] == ["record", "record"]
    quiet = Evaluation(level=Level.GREEN, reasons=(), actions=(), metrics={})
    assert monitor._alerts_for(plan, quiet) == []


def test_evaluation_to_store_queues_one_alert_per_target_with_typed_config() -> None:
    ev = evaluation()
    status = status_from_evaluation("credit", "3", ev, 0, AT)
    targets = [
        AlertTarget("retrain", "record", {"path": "/tmp/a.jsonl"}),
        AlertTarget("notify", "webhook", {"url": "http://h", "timeout": 3, "headers": {"a": "b"}}),
    ]
    request = convert.evaluation_to_store(status, metric_points(status), targets)

    assert (request.model, request.version, request.level) == ("credit", "3", "RED")
    assert [len(a.targets) for a in request.alerts] == [1, 1]
    assert all(json.loads(a.reasons_json) == list(ev.reasons) for a in request.alerts)
    # Through the store's wire type and back, config keeps its values (3 stays an int).
    back = [convert.target_from_store(a.targets[0]) for a in request.alerts]
    assert back == targets and isinstance(back[1].config["timeout"], int)


def test_alert_from_store_maps_levels_and_target() -> None:
    record = store_pb.AlertRecord(
        id=7,
        model="credit",
        version="3",
        level="RED",
        previous_level="",
        status="failed",
        attempts=2,
        last_error="webhook: down",
        reasons_json='["a", "b"]',
        targets=[store_pb.AlertTarget(action="notify", sink="webhook")],
    )
    alert = alert_to_pb(record)
    assert (alert.id, alert.level, alert.previous_level) == (7, pb.LEVEL_RED, pb.LEVEL_UNSPECIFIED)
    assert (alert.action, alert.sink, alert.status, alert.attempts) == (
        "notify",
        "webhook",
        "failed",
        2,
    )
    assert list(alert.reasons) == ["a", "b"] and alert.last_error == "webhook: down"
    assert alert_to_pb(
        store_pb.AlertRecord(id=1, level="AMBER", previous_level="GREEN")
    ).previous_level == (pb.LEVEL_GREEN)


def alert_to_pb(record: store_pb.AlertRecord) -> pb.Alert:
    return convert.alert_to_pb(convert.alert_from_store(record))


# --- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_then_caps() -> None:
    assert [backoff_seconds(a) for a in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert backoff_seconds(8) == 256.0
    assert backoff_seconds(9) == 300.0
    assert backoff_seconds(100) == 300.0
    assert backoff_seconds(10**9) == 300.0  # no overflow on absurd counts
    assert backoff_seconds(3, cap=5.0) == 5.0
    assert backoff_seconds(20, cap=10**9) == float(2**16)  # the exponent itself is capped
    assert all(isinstance(backoff_seconds(a), float) for a in (0, 1, 50))


def test_another_monitors_evaluation_comes_back_from_the_store_summary() -> None:
    """What one monitor records is what another shows for the model: metric values and
    statuses, notes, plan revision and the flagged drift (not the unflagged features)."""
    ev = evaluation()
    status = status_from_evaluation("credit", "3", ev, 4, AT)
    request = convert.evaluation_to_store(status, metric_points(status), [])
    health = store_pb.ModelHealth(
        model="credit",
        version="3",
        level=request.level,
        reasons_json=request.reasons_json,
        summary_json=request.summary_json,
    )
    health.evaluated_at.FromDatetime(AT)

    back = convert.status_from_health(health)

    assert (back.model, back.version, back.plan_revision, back.evaluated_at) == (
        "credit",
        "3",
        4,
        AT,
    )
    assert back.evaluation.metrics == ev.metrics
    assert back.evaluation.notes == ev.notes
    assert (back.evaluation.n_rows, back.evaluation.n_labelled) == (500, 200)
    assert back.evaluation.drift == {
        "ks": {"age": ev.drift["ks"]["age"]},
        "psi": {"age": ev.drift["psi"]["age"]},
    }
    assert back.evaluation.drifted == ev.drifted


def test_a_summary_from_an_older_monitor_or_with_odd_values_still_reads() -> None:
    """Summaries written before metrics were kept, or with values of the wrong kind, give what
    can be read and never fail the peer listing."""
    health = store_pb.ModelHealth(
        model="m",
        version="1",
        level="AMBER",
        reasons_json='["x"]',
        summary_json=json.dumps(
            {
                "rows": 10,
                "metrics": {"acc": {"value": "high", "status": "weird"}, "bad": 3},
                "drift": {"ks": {"f": [1, 2]}, "psi": "no"},
                "plan_revision": "two",
            }
        ),
    )
    back = convert.status_from_health(health)
    assert back.level is Level.AMBER and back.evaluation.n_rows == 10
    assert back.evaluation.metrics == {"acc": MetricResult(None, "error", "")}
    assert back.evaluation.drift == {} and back.plan_revision == 0
    old = convert.status_from_health(
        store_pb.ModelHealth(model="m", version="1", level="GREEN", summary_json='{"rows": 3}')
    )
    assert old.evaluation.metrics == {} and old.evaluation.n_rows == 3
