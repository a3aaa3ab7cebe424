from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from cyclone.hookspecs import hookimpl
from cyclone.plan import Registry, parse_plan
from cyclone.plugin_api import (
    Level,
    MetricContext,
    MetricResult,
    MetricSpec,
    Window,
    build_profile,
)
from cyclone.plugins import Plugins, build_plugin_manager
from services.monitor.evaluate import evaluate


def _raise(window: Window, ctx: MetricContext) -> MetricResult:
    raise ZeroDivisionError("oops")


class Flaky:
    @hookimpl
    def cyclone_register_metrics(self, register: Callable[[MetricSpec], None]) -> None:
        register(MetricSpec("flaky", _raise, False))


@pytest.fixture(scope="module")
def facade() -> Plugins:
    return Plugins(build_plugin_manager(env={}, extra_plugins=[("flaky_plugin", Flaky())]))


PLAN = """
model: churn
window: {kind: sliding, rows: 10000, min_labelled_rows: 100}
metrics: [accuracy, roc_auc, flaky, invalid_probability_rate]
drift: {tests: [ks, psi]}
triggers:
  - {metric: accuracy, condition: relative_drop, threshold: 0.05, level: AMBER}
  - {metric: accuracy, condition: relative_drop, threshold: 0.15, level: RED}
  - {metric: invalid_probability_rate, condition: above, threshold: 0.01, level: RED}
  - {drift: any, condition: above, threshold: 0, level: AMBER}
actions: {AMBER: [notify], RED: [retrain, notify]}
"""


def window(
    rng: np.random.Generator, n: int, accuracy: float, shift: float = 0.0, labelled: float = 1.0
) -> Window:
    y = rng.integers(0, 2, n)
    correct = rng.random(n) < accuracy
    pred = np.where(correct, y, 1 - y)
    p1 = np.clip(np.where(pred == 1, 0.8, 0.2) + rng.normal(0, 0.05, n), 0, 1)
    labels = np.array(["no", "yes"], dtype=object)[y]
    labels[rng.random(n) >= labelled] = None
    return Window(
        {"x": rng.normal(shift, 1.0, n)},
        np.array(["no", "yes"], dtype=object)[pred],
        np.column_stack([1 - p1, p1]),
        ["no", "yes"],
        labels,
        "classification",
    )


@pytest.fixture(scope="module")
def reference() -> object:
    return build_profile({"x": np.random.default_rng(0).normal(0, 1, 50_000)})


def run(facade: Plugins, w: Window, reference: object, baseline: dict[str, float] | None):  # type: ignore[no-untyped-def]
    plan = parse_plan(PLAN, Registry.from_plugins(facade))
    return evaluate(plan, w, reference, baseline, plugins=facade)  # type: ignore[arg-type]


def test_green_when_nothing_moved(facade: Plugins, reference: object) -> None:
    ev = run(facade, window(np.random.default_rng(1), 20_000, 0.9), reference, {"accuracy": 0.9})
    assert ev.level is Level.GREEN and ev.reasons == () and ev.actions == ()
    assert ev.metrics["accuracy"].value == pytest.approx(0.9, abs=0.01)
    assert ev.drifted["any"] == ()


def test_relative_drop_amber_and_red(facade: Plugins, reference: object) -> None:
    rng = np.random.default_rng(2)
    amber = run(facade, window(rng, 20_000, 0.81), reference, {"accuracy": 0.9})
    assert amber.level is Level.AMBER and amber.actions == ("notify",)
    assert "worse than baseline" in amber.reasons[0]
    red = run(facade, window(rng, 20_000, 0.7), reference, {"accuracy": 0.9})
    assert red.level is Level.RED and red.actions == ("retrain", "notify")
    no_baseline = run(facade, window(rng, 20_000, 0.7), reference, None)
    assert no_baseline.level is Level.GREEN
    assert any("no usable baseline" in n for n in no_baseline.notes)


def test_drift_trigger(facade: Plugins, reference: object) -> None:
    ev = run(
        facade,
        window(np.random.default_rng(3), 50_000, 0.9, shift=0.3),
        reference,
        {"accuracy": 0.9},
    )
    assert ev.level is Level.AMBER
    assert ev.drifted["ks"] == ("x",) and ev.drift["psi"]["x"].drifted
    assert "x" in ev.reasons[0]


def test_absolute_threshold_red(facade: Plugins, reference: object) -> None:
    w = window(np.random.default_rng(4), 5000, 0.9)
    assert w.probabilities is not None
    w.probabilities[:500] = 0.9  # rows summing to 1.8
    ev = run(facade, w, reference, {"accuracy": 0.9})
    assert ev.level is Level.RED
    assert any("invalid_probability_rate" in r for r in ev.reasons)


def test_raising_plugin_is_isolated(facade: Plugins, reference: object) -> None:
    ev = run(facade, window(np.random.default_rng(5), 2000, 0.9), reference, {"accuracy": 0.9})
    assert ev.metrics["flaky"].status == "error"
    assert "flaky_plugin" in ev.metrics["flaky"].detail and "oops" in ev.metrics["flaky"].detail
    assert ev.metrics["accuracy"].status == "ok"


def test_not_enough_labels(facade: Plugins, reference: object) -> None:
    rng = np.random.default_rng(6)
    ev = run(facade, window(rng, 1000, 0.5, labelled=0.05), reference, {"accuracy": 0.9})
    for key in ("accuracy", "roc_auc"):
        assert ev.metrics[key].status == "not_enough_data" and ev.metrics[key].value is None
    assert ev.level is Level.GREEN
    ev = run(facade, window(rng, 1000, 0.5, labelled=0.0), reference, {"accuracy": 0.9})
    assert ev.n_labelled == 0 and ev.metrics["accuracy"].value is None
    assert ev.metrics["invalid_probability_rate"].status == "ok"


def test_no_reference_skips_drift(facade: Plugins) -> None:
    ev = run(facade, window(np.random.default_rng(7), 1000, 0.9), None, {"accuracy": 0.9})
    assert ev.drift == {} and any("no reference profile" in n for n in ev.notes)
