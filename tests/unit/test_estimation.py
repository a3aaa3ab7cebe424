"""Performance estimated without labels: calibration at import, the estimated_* metrics, their
bands, the default plan's switch to realized metrics, and where estimation is blind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from cyclone.baseline import fit_calibration, fit_error_profile
from cyclone.models.convert import import_pipeline
from cyclone.plan import PlanError, Registry, default_plan, parse_plan, plan_from_dict, plan_to_dict
from cyclone.plugin_api import Level, MetricContext, MetricResult, ReferenceProfile, Window
from cyclone.plugins import Plugins, build_plugin_manager
from cyclone.reference import Calibration
from plugins import classification, estimation, regression
from services.monitor.evaluate import evaluate

WEIGHTS = np.array([1.5, -1.0, 0.7])
WEIGHTS_3 = np.array([[1.2, -0.5, 0.0], [-0.8, 1.0, 0.4], [0.0, 0.3, -1.1]])
F1_AUTO = classification._prf_metric("f1", "auto")


def draw(
    rng: np.random.Generator, n: int, shift: float = 0.0, flipped: bool = False
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Rows whose first feature is moved by ``shift`` (covariate shift); ``flipped`` reverses
    the relation between inputs and labels while the inputs stay the same (concept shift)."""
    x = rng.normal(size=(n, 3))
    x[:, 0] += shift
    logit = x @ (-WEIGHTS if flipped else WEIGHTS) - 0.3
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)


def cls_window(model: Any, x: npt.NDArray[np.float64], y: npt.NDArray[Any]) -> Window:
    return Window(
        features={},
        predictions=model.predict(x).astype(str).astype(object),
        probabilities=model.predict_proba(x),
        class_labels=[str(c) for c in model.classes_],
        labels=y.astype(str).astype(object),
        task="classification",
    )


@pytest.fixture(scope="module")
def fitted() -> tuple[LogisticRegression, MetricContext]:
    """A model, and a context whose reference was calibrated on a separate labelled sample."""
    rng = np.random.default_rng(7)
    model = LogisticRegression().fit(*draw(rng, 5000))
    calibration = fit_calibration(cls_window(model, *draw(rng, 4000)))
    assert calibration is not None and calibration.n_rows == 4000
    return model, MetricContext({}, ReferenceProfile(features={}, calibration=calibration))


def value(result: MetricResult) -> float:
    assert result.status == "ok", result.detail
    assert result.value is not None
    return result.value


def band(result: MetricResult) -> tuple[float, float]:
    low, high = result.detail.split("[")[1].split("]")[0].split(", ")
    return float(low), float(high)


def test_estimates_track_realized_under_covariate_shift(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    model, ctx = fitted
    rng = np.random.default_rng(11)
    pairs = [
        (estimation.estimated_accuracy, classification.accuracy),
        (estimation.estimated_roc_auc, classification.roc_auc),
        (estimation.estimated_f1, F1_AUTO),
    ]
    gaps: dict[str, list[float]] = {est.__name__: [] for est, _ in pairs}
    inside = 0
    shifts = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    for shift in shifts:
        w = cls_window(model, *draw(rng, 3000, shift))
        for est, real in pairs:
            estimate, realized = est(w, ctx), value(real(w, MetricContext()))
            gaps[est.__name__].append(abs(value(estimate) - realized))
            if est is estimation.estimated_accuracy:
                low, high = band(estimate)
                inside += low <= realized <= high
    for name, g in gaps.items():
        assert np.mean(g) <= 0.03, (name, g)
    # A 95% band: nearly every window's realized accuracy falls inside it.
    assert inside >= len(shifts) - 1
    # The shift moved accuracy well beyond the band width, so tracking is not trivial.
    realized = [
        value(classification.accuracy(cls_window(model, *draw(rng, 3000, s)), MetricContext()))
        for s in (0.0, 2.0)
    ]
    assert realized[1] - realized[0] > 0.08


def test_estimate_cannot_see_concept_shift(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    """The documented limitation (docs/monitoring.md): same inputs, reversed labels."""
    model, ctx = fitted
    rng = np.random.default_rng(3)
    before = cls_window(model, *draw(rng, 3000))
    after = cls_window(model, *draw(rng, 3000, flipped=True))
    est_before = value(estimation.estimated_accuracy(before, ctx))
    est_after = value(estimation.estimated_accuracy(after, ctx))
    real_after = value(classification.accuracy(after, MetricContext()))
    assert abs(est_after - est_before) < 0.02  # the estimate stays flat
    assert est_after - real_after > 0.4  # while the model is now mostly wrong


def test_multiclass_estimates_track_realized() -> None:
    rng = np.random.default_rng(5)

    def draw3(n: int, shift: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        x = rng.normal(size=(n, 3))
        x[:, 1] += shift
        logits = x @ WEIGHTS_3
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
        return x, y

    model = LogisticRegression().fit(*draw3(5000, 0.0))
    calibration = fit_calibration(cls_window(model, *draw3(4000, 0.0)))
    assert calibration is not None and len(calibration.maps) == 3
    ctx = MetricContext({"average": "macro"}, ReferenceProfile({}, calibration=calibration))
    for shift in (0.0, 1.5):
        w = cls_window(model, *draw3(3000, shift))
        assert (
            abs(
                value(estimation.estimated_accuracy(w, ctx))
                - value(classification.accuracy(w, MetricContext()))
            )
            <= 0.03
        )
        assert (
            abs(value(estimation.estimated_f1(w, ctx)) - value(F1_AUTO(w, MetricContext()))) <= 0.04
        )
        assert (
            abs(
                value(estimation.estimated_roc_auc(w, ctx))
                - value(classification.roc_auc(w, MetricContext()))
            )
            <= 0.03
        )


def test_bound_param_returns_band_edges(fitted: tuple[LogisticRegression, MetricContext]) -> None:
    model, ctx = fitted
    w = cls_window(model, *draw(np.random.default_rng(1), 2000))
    point = estimation.estimated_accuracy(w, ctx)
    low = estimation.estimated_accuracy(w, MetricContext({"bound": "lower"}, ctx.reference))
    high = estimation.estimated_accuracy(w, MetricContext({"bound": "upper"}, ctx.reference))
    assert value(low) < value(point) < value(high)
    assert (value(low), value(high)) == pytest.approx(band(point), abs=1e-4)
    bad = estimation.estimated_accuracy(w, MetricContext({"bound": "median"}, ctx.reference))
    assert bad.status == "error" and "params.bound" in bad.detail
    bad_avg = estimation.estimated_f1(w, MetricContext({"average": "micro"}, ctx.reference))
    assert bad_avg.status == "error" and "params.average" in bad_avg.detail


def test_without_calibration_there_is_no_estimate(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    model, _ = fitted
    w = cls_window(model, *draw(np.random.default_rng(2), 500))
    for ctx in (MetricContext(), MetricContext({}, ReferenceProfile(features={}))):
        result = estimation.estimated_accuracy(w, ctx)
        assert result.status == "not_enough_data" and "no calibration" in result.detail
    no_probs = Window({}, w.predictions, None, w.class_labels, None, "classification")
    assert estimation.estimated_roc_auc(no_probs, MetricContext()).status == "not_enough_data"


def test_too_few_labelled_rows_give_no_calibration(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    model, _ = fitted
    assert fit_calibration(cls_window(model, *draw(np.random.default_rng(4), 20))) is None


def test_calibration_survives_json_and_old_profiles_load(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    _, ctx = fitted
    assert ctx.reference is not None
    again = ReferenceProfile.from_json(ctx.reference.to_json())
    assert again.calibration == ctx.reference.calibration
    old = ReferenceProfile(features={}).to_dict()
    assert "calibration" not in old and "error_profile" not in old
    assert ReferenceProfile.from_dict(old).calibration is None
    broken = {**old, "calibration": {"maps": [{"x": [0.1, 0.2], "y": [0.3]}], "n_rows": 9}}
    with pytest.raises(ValueError, match="calibration map"):
        ReferenceProfile.from_dict(broken)


def test_calibration_of_a_wrong_class_count_is_an_error() -> None:
    calibration = Calibration((((0.0, 1.0), (0.0, 1.0)),) * 3, 100)
    w = Window(
        {},
        np.array(["a", "b"], dtype=object),
        np.array([[0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.4, 0.4]]),
        ["a", "b", "c", "d"],
        None,
        "classification",
    )
    result = estimation.estimated_accuracy(
        w, MetricContext({}, ReferenceProfile({}, calibration=calibration))
    )
    assert result.status == "error" and "3 classes" in result.detail


def test_estimated_mae_follows_the_prediction_mix() -> None:
    """Error that grows with the prediction: moving predictions up raises the estimate."""
    rng = np.random.default_rng(9)

    def draw_reg(n: int, shift: float) -> Window:
        x = rng.normal(shift, 1.0, n)
        prediction = 2 * x
        labels = prediction + rng.normal(0, 1, n) * (1 + np.abs(x))
        return Window({}, prediction, None, [], labels, "regression")

    profile = fit_error_profile(draw_reg(4000, 0.0))
    assert profile is not None
    ctx = MetricContext({}, ReferenceProfile({}, error_profile=profile))
    estimates = []
    for shift in (0.0, 1.0):
        w = draw_reg(3000, shift)
        realized = value(regression.mae(w, MetricContext()))
        estimates.append(value(estimation.estimated_mae(w, ctx)))
        assert abs(estimates[-1] - realized) / realized < 0.08
    assert estimates[1] > estimates[0] * 1.1
    # Beyond the reference range the estimate is clipped to the end bins, and says so.
    far = estimation.estimated_mae(draw_reg(3000, 3.0), ctx)
    assert "outside the reference range" in far.detail
    assert "; 0.0% of predictions" not in far.detail
    assert ReferenceProfile.from_json(ctx.reference.to_json()).error_profile == profile  # type: ignore[union-attr]
    none = estimation.estimated_mae(draw_reg(10, 0.0), MetricContext())
    assert none.status == "not_enough_data" and "no error profile" in none.detail


def test_plugins_register_from_the_entry_point() -> None:
    facade = Plugins(build_plugin_manager(env={}))
    specs = facade.metrics
    for name in ("estimated_accuracy", "estimated_f1", "estimated_roc_auc"):
        assert specs[name].task == "classification" and not specs[name].needs_labels
        assert specs[name].plugin.endswith("estimation")
    assert specs["estimated_mae"].task == "regression"
    assert not specs["estimated_mae"].higher_is_better


UNTIL = """
model: m
window: {kind: sliding, rows: 10000, min_labelled_rows: 100}
metrics: [accuracy, estimated_accuracy]
triggers:
  - {metric: estimated_accuracy, condition: below, threshold: 0.99, level: AMBER,
     until_labelled: true}
  - {metric: accuracy, condition: below, threshold: 0.99, level: RED}
"""


def test_until_labelled_hands_over_to_realized_metrics(
    fitted: tuple[LogisticRegression, MetricContext],
) -> None:
    model, ctx = fitted
    plan = parse_plan(UNTIL)
    assert plan.triggers[0].until_labelled and not plan.triggers[1].until_labelled
    assert parse_plan(json.dumps(plan_to_dict(plan))) == plan
    rng = np.random.default_rng(8)
    x, y = draw(rng, 1000)
    unlabelled = cls_window(model, x, y)
    unlabelled.labels[50:] = None  # type: ignore[index]
    early = evaluate(plan, unlabelled, ctx.reference)
    assert early.level is Level.AMBER and "estimated_accuracy" in early.reasons[0]
    late = evaluate(plan, cls_window(model, x, y), ctx.reference)
    assert late.level is Level.RED
    assert [r.trigger.metric for r in late.triggers if r.fired] == ["accuracy"]
    [note] = [n for n in late.notes if n.startswith("estimated_accuracy")]
    assert "vs realized accuracy" in note and "1000 labelled rows" in note


def test_until_labelled_must_be_a_boolean() -> None:
    text = UNTIL.replace("until_labelled: true", "until_labelled: sometimes")
    with pytest.raises(PlanError) as err:
        parse_plan(text)
    assert err.value.problems == [
        "triggers[0].until_labelled: expected true or false, got 'sometimes'"
    ]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_default_plan_validates_and_estimates_until_labelled(task: Any) -> None:
    plan = default_plan("m", task)
    assert plan_from_dict(plan_to_dict(plan), Registry.from_plugins()) == plan
    estimated = [t for t in plan.triggers if t.metric and t.metric.startswith("estimated_")]
    assert estimated and all(t.until_labelled for t in estimated)
    assert not any(t.until_labelled for t in plan.triggers if t not in estimated)


def test_import_stores_calibration_and_estimated_baseline(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    columns = ["a", "b", "c"]
    x_fit, y_fit = draw(rng, 1500)
    model = LogisticRegression().fit(pd.DataFrame(x_fit, columns=columns), y_fit)
    # The import sample is held out from fitting, and the estimate is checked on rows held out
    # from both: on the calibration's own rows estimated and realized agree by construction.
    x, y = draw(rng, 1500)
    frame = pd.DataFrame(x, columns=columns).assign(y=y)
    target, _, _ = import_pipeline(model, "m", tmp_path, sample=frame, label_column="y")
    profile = ReferenceProfile.load(target / "reference.json")
    assert profile.calibration is not None and profile.calibration.n_rows == 1500
    baseline = json.loads((target / "evaluation.json").read_text())["metrics"]
    assert {"accuracy", "estimated_accuracy"} <= set(baseline)
    ctx = MetricContext({}, profile)
    for shift in (0.0, 1.5):
        held_out = draw(rng, 3000, shift)
        window = cls_window(model, pd.DataFrame(held_out[0], columns=columns), held_out[1])
        realized = value(classification.accuracy(window, MetricContext()))
        estimated = value(estimation.estimated_accuracy(window, ctx))
        assert estimated == pytest.approx(realized, abs=0.03), shift
    unlabelled, _, _ = import_pipeline(model, "m", tmp_path, sample=frame.drop(columns="y"))
    assert ReferenceProfile.load(unlabelled / "reference.json").calibration is None


def test_regressor_import_stores_error_profile(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)

    def rows(n: int) -> pd.DataFrame:
        frame = pd.DataFrame(rng.normal(size=(n, 2)), columns=["a", "b"])
        return frame.assign(y=frame["a"] * 3 + rng.normal(0, 1, n))

    fit_rows = rows(600)
    model = LinearRegression().fit(fit_rows[["a", "b"]], fit_rows["y"])
    # Profiled on rows the model was not fitted on; checked on rows held out from both.
    target, _, _ = import_pipeline(model, "r", tmp_path, sample=rows(600), label_column="y")
    profile = ReferenceProfile.load(target / "reference.json")
    assert profile.error_profile is not None and profile.calibration is None
    baseline = json.loads((target / "evaluation.json").read_text())["metrics"]
    assert {"mae", "estimated_mae"} <= set(baseline)
    held_out = rows(3000)
    window = Window(
        features={},
        predictions=model.predict(held_out[["a", "b"]]),
        labels=held_out["y"].to_numpy(),
        task="regression",
    )
    realized = value(regression.mae(window, MetricContext()))
    estimated = value(estimation.estimated_mae(window, MetricContext({}, profile)))
    assert estimated == pytest.approx(realized, rel=0.05)


def test_status_lines_put_estimated_next_to_realized() -> None:
    from cyclone.monitor.v1 import monitor_service_pb2 as mpb
    from cyclone_app.cli_mesh import estimated_lines as _estimated_lines

    status = mpb.ModelStatus()
    status.metrics.add(name="accuracy", value=0.81, status="ok")
    status.metrics.add(name="estimated_accuracy", value=0.84, status="ok", detail="band")
    status.metrics.add(name="estimated_roc_auc", value=0.9, status="ok", detail="band")
    status.metrics.add(name="roc_auc", status="not_enough_data")
    status.metrics.add(name="estimated_f1", status="not_enough_data")
    assert _estimated_lines(status.metrics) == [
        "estimated_accuracy 0.84 (band); realized accuracy 0.81",
        "estimated_roc_auc 0.9 (band); realized: not enough labels yet",
    ]
