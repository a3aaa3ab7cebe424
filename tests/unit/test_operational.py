"""Operational metrics in the plan: latency quantiles and throughput from the store's columns."""

from __future__ import annotations

import numpy as np
import pytest

from cyclone.plan import parse_plan
from cyclone.plugin_api import Level, MetricContext, MetricResult, Window
from cyclone.plugins import Plugins, build_plugin_manager
from cyclone.store.v1 import store_service_pb2 as store_pb
from plugins import operational
from services.monitor import convert
from services.monitor.evaluate import evaluate
from services.monitor.window import window_from_chunks


def traffic(latency: list[float], seconds: list[float] | None = None) -> Window:
    n = len(latency)
    return Window(
        features={},
        predictions=np.zeros(n),
        task="regression",
        latency_ms=np.asarray(latency, dtype=np.float64),
        created_at=None if seconds is None else np.asarray(seconds, dtype=np.float64),
    )


def ok(result: MetricResult) -> float:
    assert result.status == "ok", result.detail
    assert result.value is not None
    return result.value


def test_latency_quantiles_skip_rows_without_latency() -> None:
    latency = [*range(1, 101), np.nan]
    w = traffic([float(v) for v in latency])
    assert ok(operational._fixed_quantile(0.5)(w, MetricContext())) == pytest.approx(50.5)
    p99 = operational._fixed_quantile(0.99)(w, MetricContext())
    assert ok(p99) == pytest.approx(99.01) and "100 rows" in p99.detail
    q = operational.latency_quantile_ms(w, MetricContext({"q": 0.9}))
    assert ok(q) == pytest.approx(90.1)


def test_no_latency_is_not_enough_data() -> None:
    plain = Window(features={}, predictions=np.zeros(3), task="regression")
    result = operational._fixed_quantile(0.5)(plain, MetricContext())
    assert result.status == "not_enough_data" and "no latencies" in result.detail
    all_nan = operational._fixed_quantile(0.5)(traffic([np.nan] * 3), MetricContext())
    assert all_nan.status == "not_enough_data" and "no row" in all_nan.detail


@pytest.mark.parametrize("q", [None, 0, 1, 1.5, "0.9", True])
def test_bad_quantile_names_the_param(q: object) -> None:
    result = operational.latency_quantile_ms(traffic([1.0]), MetricContext({"q": q}))
    assert result.status == "error" and result.detail.startswith("params.q:"), result.detail


def test_throughput_over_the_plan_window_or_the_rows_span() -> None:
    w = traffic([1.0] * 30, seconds=[1000.0 + i for i in range(30)])
    assert ok(operational.throughput_rps(w, MetricContext(window_seconds=60.0))) == 0.5
    spanned = operational.throughput_rps(w, MetricContext())
    assert ok(spanned) == pytest.approx(30 / 29) and "first to last row" in spanned.detail
    one = traffic([1.0], seconds=[5.0])
    assert operational.throughput_rps(one, MetricContext()).status == "not_enough_data"
    no_times = traffic([1.0, 2.0])
    assert operational.throughput_rps(no_times, MetricContext()).status == "not_enough_data"
    assert operational.throughput_rps(traffic([]), MetricContext()).status == "not_enough_data"


def test_window_carries_latency_and_times_from_the_store() -> None:
    chunks = [
        store_pb.GetTrainingDataResponse(
            features={"x": store_pb.Column(numbers=[1.0, 2.0])},
            predictions=store_pb.Column(numbers=[10.0, 20.0]),
            labels=store_pb.Column(numbers=[0.0, 0.0]),
            labelled=[False, True],
            latency_ms=[1.5, 3.0],
            created_at_micros=[1_000_000, 3_000_000],
        )
    ]
    w = window_from_chunks(
        [convert.window_chunk_from_store(c, "regression") for c in chunks], "regression"
    )
    assert w.latency_ms is not None and list(w.latency_ms) == [1.5, 3.0]
    assert w.created_at is not None and list(w.created_at) == [1.0, 3.0]
    assert w.labelled.latency_ms is not None and list(w.labelled.latency_ms) == [3.0]
    # A store that sends no latencies (an older one): the window has none, not zeros.
    old = store_pb.GetTrainingDataResponse()
    old.CopyFrom(chunks[0])
    old.ClearField("latency_ms")
    w = window_from_chunks([convert.window_chunk_from_store(old, "regression")], "regression")
    assert w.latency_ms is None and w.created_at is None


PLAN = """
model: m
window: {kind: sliding, duration: 1m, min_labelled_rows: 10}
metrics: [latency_p99_ms, throughput_rps, {name: latency_quantile_ms, params: {q: 0.5}, key: p50}]
triggers:
  - {metric: latency_p99_ms, condition: above, threshold: 200, level: RED}
  - {metric: throughput_rps, condition: below, threshold: 1, level: AMBER}
"""


def test_plan_triggers_on_operational_metrics() -> None:
    facade = Plugins(build_plugin_manager(env={}))
    plan = parse_plan(PLAN)
    slow = traffic([5.0] * 95 + [500.0] * 5, seconds=[float(i) for i in range(100)])
    ev = evaluate(plan, slow, plugins=facade)
    assert ev.level is Level.RED
    assert ev.metrics["p50"].value == 5.0
    assert ev.metrics["throughput_rps"].value == pytest.approx(100 / 60)
    assert ev.reasons[0].startswith("latency_p99_ms = ")
    quiet = traffic([5.0] * 30, seconds=[float(i) for i in range(30)])
    ev = evaluate(plan, quiet, plugins=facade)
    assert ev.level is Level.AMBER and ev.reasons[0].startswith("throughput_rps = 0.5")


def test_plugins_registered() -> None:
    specs = Plugins(build_plugin_manager(env={})).metrics
    for name in ("latency_p50_ms", "latency_p99_ms", "latency_quantile_ms", "throughput_rps"):
        assert specs[name].plugin.endswith("operational") and not specs[name].needs_labels
    assert not specs["latency_p99_ms"].higher_is_better
    assert "error_rate" not in specs and "uptime" not in specs
