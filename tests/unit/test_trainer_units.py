"""Pure parts of retraining: the plan's retrain: section, window requests, the time-ordered
holdout and the promotion decision (better, not better, noise)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import numpy as np
import pytest

from cyclone.plan import MetricRef, PlanError, Registry, default_plan, parse_plan, primary_metric
from cyclone.plugins import Plugins, build_plugin_manager
from services.trainer.data import window_request
from services.trainer.evaluate import Scored, decide, split_holdout


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_plugins(Plugins(build_plugin_manager(env={})))


def plan(text: str, registry: Registry):  # type: ignore[no-untyped-def]
    return parse_plan(textwrap.dedent(text), registry)


def test_plan_without_retrain_section_gets_defaults(registry: Registry) -> None:
    spec = plan("model: m\n", registry).retrain
    assert (spec.kind, spec.rows, spec.family, spec.min_rows) == ("auto", 50_000, "refit", 200)
    assert primary_metric(default_plan("m", "classification"), "classification").name == "accuracy"
    assert primary_metric(default_plan("m", "regression"), "regression").name == "rmse"


def test_retrain_section_round_trips(registry: Registry) -> None:
    from cyclone.plan import plan_to_yaml

    p = plan(
        """
        model: m
        retrain: {window: sliding, duration: 2h, min_rows: 50, holdout: 0.25, margin: 0.02,
                  metric: f1_macro, family: gradient_boosting, params: {n_estimators: 20}}
        """,
        registry,
    )
    assert p.retrain.duration_seconds == 7200 and p.retrain.rows is None
    assert p.retrain.metric == MetricRef("f1_macro")
    assert parse_plan(plan_to_yaml(p), registry) == p


def test_retrain_errors_name_the_field(registry: Registry) -> None:
    with pytest.raises(PlanError) as info:
        plan(
            """
            model: m
            retrain: {window: rolling, holdout: 0.9, margin: -1, family: nope, metric: mean,
                      min_rows: 3, colour: red}
            """,
            registry,
        )
    fields = {p.split(":")[0] for p in info.value.problems}
    assert {
        "retrain.window",
        "retrain.holdout",
        "retrain.margin",
        "retrain.family",
        "retrain.metric",
        "retrain.min_rows",
        "retrain.colour",
    } <= fields
    with pytest.raises(PlanError) as info:
        plan("model: m\nretrain: {window: expanding, rows: 10}\n", registry)
    assert info.value.problems == ["retrain.rows: only a sliding window has a size"]


def test_window_requests(registry: Registry) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    by_rows = window_request("m", plan("model: m\nretrain: {rows: 500}\n", registry).retrain, now)
    assert by_rows.last_n == 500 and not by_rows.HasField("start")
    by_time = window_request(
        "m", plan("model: m\nretrain: {duration: 1h}\n", registry).retrain, now
    )
    assert by_time.last_n == 0
    assert by_time.start.ToDatetime(tzinfo=UTC) == datetime(2024, 12, 31, 23, tzinfo=UTC)
    expanding = window_request(
        "m", plan("model: m\nretrain: {window: expanding}\n", registry).retrain, now
    )
    assert expanding.last_n == 0 and not expanding.HasField("start")


def test_holdout_is_the_newest_rows_never_shuffled() -> None:
    train, holdout = split_holdout(10, 0.3)
    rows = np.arange(10)
    assert list(rows[train]) == list(range(7)) and list(rows[holdout]) == [7, 8, 9]
    assert split_holdout(3, 0.01) == (slice(0, 2), slice(2, 3))  # at least one held out
    assert split_holdout(3, 0.99) == (slice(0, 1), slice(1, 3))  # at least one to train on
    with pytest.raises(ValueError, match="rows"):
        split_holdout(1, 0.2)


def _classifier(labels: np.ndarray, right: np.ndarray) -> Scored:
    predictions = np.where(right, labels, np.where(labels == "a", "b", "a")).astype(object)
    probabilities = np.column_stack(
        [(predictions == "a").astype(float), (predictions == "b").astype(float)]
    )
    return Scored(predictions, probabilities, ("a", "b"))


def _decide(champion_right: float, challenger_right: float, n: int, margin: float = 0.01):  # type: ignore[no-untyped-def]
    from cyclone.plugins import metrics

    rng = np.random.default_rng(1)
    labels = rng.choice(["a", "b"], n).astype(object)
    old = _classifier(labels, rng.uniform(size=n) < champion_right)
    new = _classifier(labels, rng.uniform(size=n) < challenger_right)
    return decide(
        metrics()["accuracy"],
        MetricRef("accuracy"),
        "classification",
        labels,
        old,
        new,
        margin=margin,
        confidence=0.95,
        resamples=300,
    )


def test_clearly_better_challenger_is_promoted() -> None:
    d = _decide(0.6, 0.9, 1000)
    assert d.promote and d.lower_bound > 0 and d.improvement > 0.2
    assert d.text.startswith("promote")


def test_worse_challenger_is_not_promoted() -> None:
    d = _decide(0.9, 0.6, 1000)
    assert not d.promote and d.improvement < 0 and "not better" in d.text


def test_small_noisy_improvement_is_not_promoted() -> None:
    d = _decide(0.70, 0.74, 40, margin=0.0)  # a few rows: could be luck
    assert not d.promote
    assert d.lower_bound <= 0


def test_improvement_below_margin_is_not_promoted() -> None:
    d = _decide(0.80, 0.82, 5_000, margin=0.10)  # real but smaller than 10 %
    assert not d.promote and d.improvement < d.required


def test_lower_is_better_metrics_flip_the_direction() -> None:
    from cyclone.plugins import metrics

    rng = np.random.default_rng(2)
    y = rng.normal(size=500)
    good = Scored(y + rng.normal(scale=0.1, size=500))
    bad = Scored(y + rng.normal(scale=1.0, size=500))
    spec = metrics()["rmse"]
    kwargs = {"margin": 0.05, "confidence": 0.95, "resamples": 200}
    assert decide(spec, MetricRef("rmse"), "regression", y, bad, good, **kwargs).promote
    assert not decide(spec, MetricRef("rmse"), "regression", y, good, bad, **kwargs).promote


def test_status_says_what_happens_next_to_a_red_model() -> None:
    from cyclone_app.cli_mesh import next_step

    assert next_step([]).startswith("no retraining job yet")
    waiting = {"id": 3, "model": "m", "state": "running", "new_version": None, "message": ""}
    waiting["stage"] = "attempt 2/3 at 10:00:15 UTC, with 4000 labelled rows after the change"
    assert next_step([waiting]) == f"job 3 running: {waiting['stage']}"
    done = {**waiting, "state": "rejected", "stage": "done"}
    done["message"] = "retraining did not beat the champion after 3 attempts: ..."
    assert next_step([done, waiting]).startswith("no further retraining until the level changes")
    assert "did not beat the champion after 3 attempts" in next_step([done])
    promoted = {**waiting, "state": "succeeded", "new_version": "4"}
    assert next_step([promoted]) == "job 3 registered v4: its rollout decides"


def test_auto_window_plan_keys_and_errors_name_the_field(registry: Registry) -> None:
    from cyclone.plan import plan_to_yaml

    spec = plan("model: m\nretrain: {fresh_rows: 500, attempts: 2, wait: 5m}\n", registry).retrain
    assert (spec.kind, spec.fresh_rows, spec.attempts, spec.wait_seconds) == ("auto", 500, 2, 300)
    again = plan(plan_to_yaml(plan("model: m\nretrain: {fresh_rows: 500}\n", registry)), registry)
    assert again.retrain.fresh_rows == 500 and again.retrain.kind == "auto"
    # A duration alone keeps its meaning from before auto: the sliding hour.
    assert plan("model: m\nretrain: {duration: 1h}\n", registry).retrain.kind == "sliding"
    bad = {
        "retrain: {window: newest}": "retrain.window: expected 'auto', 'sliding' or 'expanding'",
        "retrain: {window: auto, duration: 1h}": "retrain.duration: an auto window is sized",
        "retrain: {window: sliding, fresh_rows: 10}": "retrain.fresh_rows: only an auto window",
        "retrain: {attempts: 0}": "retrain.attempts: must be at least 1",
        "retrain: {fresh_rows: many}": "retrain.fresh_rows: expected an integer",
    }
    for text, message in bad.items():
        with pytest.raises(PlanError) as info:
            plan(f"model: m\n{text}\n", registry)
        assert any(p.startswith(message) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("seed", range(5))
def test_change_point_false_alarms_and_newest_change(seed: int) -> None:
    from services.trainer.changepoint import find_change, per_row_loss

    rng = np.random.default_rng(seed)
    # A stationary loss (10 % errors over 20k rows): no change point.
    assert find_change((rng.uniform(size=20_000) < 0.1).astype(float)) is None
    # Two rises: the newest is where the new world starts.
    loss = np.concatenate(
        [rng.uniform(size=n) < p for n, p in ((4000, 0.1), (3000, 0.25), (2000, 0.5))]
    ).astype(float)
    change = find_change(loss)
    assert change is not None and abs(change.index - 7000) <= 80
    assert change.loss_after > 0.4 and change.loss_before < 0.35
    # A loss that fell (a better model took over) is no change to retrain from.
    assert find_change(loss[::-1].copy()) is None
    # Regression: absolute errors that grow.
    labels = rng.normal(0, 1, 3000)
    served = labels + np.where(np.arange(3000) < 2000, 0.1, 1.0) * rng.normal(0, 1, 3000)
    rise = find_change(per_row_loss("regression", labels, served))
    assert rise is not None and abs(rise.index - 2000) <= 80


def test_auto_window_cuts_at_the_change_and_survives_empty_windows() -> None:
    from services.trainer.auto import NEWEST, SINCE_CHANGE, plan_auto
    from services.trainer.changepoint import ChangePoint

    for rows in (0, 1):
        empty = plan_auto(rows, 0.2, None)
        assert empty.fresh_rows == rows and empty.change is None
    cut = plan_auto(1000, 0.2, ChangePoint(600, 0.1, 0.5, 1e-9))
    # The holdout is the newest fifth of the rows after the change, not of the whole window.
    assert cut.holdout == slice(920, 1000) and cut.fresh_rows == 400
    assert cut.candidates == {SINCE_CHANGE: slice(600, 920), NEWEST: slice(0, 920)}
    plain = plan_auto(1000, 0.2, None)
    assert plain.holdout == slice(800, 1000) and plain.candidates == {NEWEST: slice(0, 800)}
