from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

import plugins.classification
import plugins.features
import plugins.regression
import plugins.sanity
from cyclone.plugin_api import (
    FeatureSchema,
    MetricContext,
    MetricResult,
    MetricSpec,
    Window,
    build_profile,
)
from cyclone.plugins import Plugins, build_plugin_manager


@pytest.fixture(scope="module")
def registry() -> dict[str, MetricSpec]:
    pm = build_plugin_manager(
        load_entrypoints=False,
        extra_plugins=[
            plugins.classification,
            plugins.regression,
            plugins.sanity,
            plugins.features,
        ],
    )
    facade = Plugins(pm)
    assert facade.problems == []
    return facade.metrics


def compute(
    registry: dict[str, MetricSpec], name: str, window: Window, **params: Any
) -> MetricResult:
    return registry[name].fn(window, MetricContext(params))


def classification_window(
    rng: np.random.Generator, n: int, k: int, unlabelled: float = 0.3
) -> tuple[Window, np.ndarray, np.ndarray, np.ndarray]:
    classes = [f"c{i}" for i in range(k)]
    logits = rng.normal(size=(n, k))
    y = rng.integers(0, k, size=n)
    logits[np.arange(n), y] += 1.0  # informative but imperfect
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    labels = np.array(classes, dtype=object)[y]
    mask = rng.random(n) < unlabelled
    labels[mask] = None
    window = Window(
        features={"x": logits[:, 0]},
        predictions=np.array(classes, dtype=object)[pred],
        probabilities=probs,
        class_labels=classes,
        labels=labels,
        task="classification",
    )
    keep = ~mask
    return window, y[keep], pred[keep], probs[keep]


@pytest.mark.parametrize("k", [2, 4])
def test_classification_matches_sklearn(registry: dict[str, MetricSpec], k: int) -> None:
    rng = np.random.default_rng(k)
    window, y, pred, probs = classification_window(rng, 5000, k)
    assert window.n_labelled == len(y)
    avg = "binary" if k == 2 else "macro"
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, average=avg, zero_division=0),
        "recall": skm.recall_score(y, pred, average=avg, zero_division=0),
        "f1": skm.f1_score(y, pred, average=avg, zero_division=0),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
        "precision_macro": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(y, pred, average="macro", zero_division=0),
        "roc_auc": skm.roc_auc_score(y, probs[:, 1])
        if k == 2
        else skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
        "log_loss": skm.log_loss(y, probs, labels=list(range(k))),
    }
    for name, value in expected.items():
        got = compute(registry, name, window)
        assert got.status == "ok", (name, got)
        assert got.value == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_positive_label_param(registry: dict[str, MetricSpec]) -> None:
    window, y, pred, probs = classification_window(np.random.default_rng(7), 3000, 2)
    got = compute(registry, "recall", window, positive_label="c0")
    assert got.value == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    auc = compute(registry, "roc_auc", window, positive_label="c0")
    assert auc.value == pytest.approx(skm.roc_auc_score(y == 0, probs[:, 0]))


def test_regression_matches_sklearn(registry: dict[str, MetricSpec]) -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(10, 3, size=4000)
    pred = y + rng.normal(0, 1, size=4000)
    labels = y.copy()
    labels[rng.random(4000) < 0.25] = np.nan
    window = Window({"x": y}, pred, labels=labels, task="regression")
    keep = ~np.isnan(labels)
    expected = {
        "mae": skm.mean_absolute_error(y[keep], pred[keep]),
        "rmse": np.sqrt(skm.mean_squared_error(y[keep], pred[keep])),
        "mape": skm.mean_absolute_percentage_error(y[keep], pred[keep]),
        "r2": skm.r2_score(y[keep], pred[keep]),
    }
    for name, value in expected.items():
        assert compute(registry, name, window).value == pytest.approx(value, rel=1e-9), name


def test_no_labels_is_not_enough_data(registry: dict[str, MetricSpec]) -> None:
    cls_window, *_ = classification_window(np.random.default_rng(2), 100, 2, unlabelled=1.0)
    reg_window = Window({}, np.ones(10), labels=None, task="regression")
    for name in ("accuracy", "f1", "roc_auc", "log_loss"):
        got = compute(registry, name, cls_window)
        assert got.status == "not_enough_data" and got.value is None, name
    for name in ("mae", "rmse", "mape", "r2"):
        got = compute(registry, name, reg_window)
        assert got.status == "not_enough_data" and got.value is None, name


def test_single_class_auc_and_constant_r2(registry: dict[str, MetricSpec]) -> None:
    probs = np.tile([0.3, 0.7], (50, 1))
    window = Window(
        {},
        np.array(["b"] * 50, dtype=object),
        probs,
        ["a", "b"],
        np.array(["b"] * 50, dtype=object),
        "classification",
    )
    auc = compute(registry, "roc_auc", window)
    assert auc.status == "not_enough_data" and "single class" in auc.detail
    assert compute(registry, "accuracy", window).value == 1.0
    flat = Window({}, np.arange(5.0), labels=np.full(5, 2.0), task="regression")
    assert compute(registry, "r2", flat).status == "not_enough_data"


def test_sanity_metrics(registry: dict[str, MetricSpec]) -> None:
    rng = np.random.default_rng(3)
    pred = rng.normal(size=10_000)
    window = Window({}, pred, task="regression")
    assert compute(registry, "prediction_p95", window).value == pytest.approx(
        np.quantile(pred, 0.95)
    )
    assert compute(registry, "prediction_mean", window).value == pytest.approx(pred.mean())
    assert compute(registry, "constant_predictions", window).value == 0.0
    stuck = Window({}, np.full(100, 4.2), task="regression")
    assert compute(registry, "constant_predictions", stuck).value == 1.0

    profile = build_profile({}, predictions=rng.normal(size=10_000), task="regression")
    shifted = Window({}, pred + 3.0, task="regression")
    ctx = MetricContext({}, profile)
    rate = registry["prediction_out_of_range_rate"].fn(shifted, ctx).value
    assert rate == pytest.approx(np.mean(pred + 3.0 > profile.prediction.max))  # type: ignore[union-attr]
    no_ref = compute(registry, "prediction_out_of_range_rate", shifted)
    assert no_ref.status == "not_enough_data"


def test_invalid_probabilities(registry: dict[str, MetricSpec]) -> None:
    probs = np.array([[0.2, 0.8], [0.5, 0.5], [1.2, -0.2], [0.3, 0.3], [0.4, 0.6]])
    window = Window(
        {}, np.array(["a"] * 5, dtype=object), probs, ["a", "b"], None, "classification"
    )
    assert compute(registry, "invalid_probability_rate", window).value == pytest.approx(2 / 5)


def test_feature_validity(registry: dict[str, MetricSpec]) -> None:
    rng = np.random.default_rng(4)
    train = {"age": rng.uniform(18, 90, 1000), "plan": rng.choice(["a", "b"], 1000).astype(object)}
    schema = {
        "age": FeatureSchema("age", "numeric", 0, 120),
        "plan": FeatureSchema("plan", "categorical"),
    }
    profile = build_profile(train, schema=schema)
    age = np.array([30.0, np.nan, 150.0, -1.0, 40.0, 50.0])
    plan = np.array(["a", "zzz", None, "b", "b", "c"], dtype=object)
    window = Window({"age": age, "plan": plan}, np.zeros(6), task="regression")
    ctx = MetricContext({}, profile)
    assert registry["feature_missing_rate"].fn(window, ctx).value == pytest.approx(2 / 12)
    out = registry["feature_out_of_range_rate"].fn(window, ctx)
    assert out.value == pytest.approx(2 / 5) and "age" in out.detail
    assert registry["feature_unseen_category_rate"].fn(window, ctx).value == pytest.approx(2 / 5)
    typed = Window({"age": np.array([1, "x", None, "3"], dtype=object)}, np.zeros(4))
    assert registry["feature_type_error_rate"].fn(typed, ctx).value == pytest.approx(1 / 3)
    only_age = registry["feature_missing_rate"].fn(window, MetricContext({"features": ["age"]}))
    assert only_age.value == pytest.approx(1 / 6)


def test_a_few_identical_predictions_are_not_a_stuck_model(
    registry: dict[str, MetricSpec],
) -> None:
    from cyclone.reference import CategoricalProfile, ReferenceProfile

    few = Window({}, np.full(3, 4.2), task="regression")
    assert compute(registry, "constant_predictions", few).status == "not_enough_data"

    def same_class(n: int) -> Window:
        return Window(
            {},
            np.array(["0"] * n, dtype=object),
            probabilities=np.tile([0.9, 0.1], (n, 1)),
            class_labels=["0", "1"],
            task="classification",
        )

    # A model that says "0" 90 % of the time: 30 zeros in a row are a 4 % chance, not a fault.
    mostly_zero = ReferenceProfile(
        {}, prediction=CategoricalProfile({"0": 900, "1": 100}, 1000, 0.0)
    )
    ctx = MetricContext({}, mostly_zero)
    result = registry["constant_predictions"].fn(same_class(30), ctx)
    assert result.status == "not_enough_data" and "90%" in result.detail
    assert registry["constant_predictions"].fn(same_class(200), ctx).value == 1.0
    assert compute(registry, "constant_predictions", same_class(30)).value == 1.0  # no reference
    mixed = Window({}, np.array([1.0, 2.0]), task="regression")
    assert compute(registry, "constant_predictions", mixed).value == 0.0
