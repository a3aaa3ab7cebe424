from __future__ import annotations

import textwrap

import pytest

from cyclone.plan import (
    PlanError,
    Registry,
    Trigger,
    default_plan,
    format_duration,
    parse_duration,
    parse_plan,
    plan_to_yaml,
)
from cyclone.plugin_api import Level
from cyclone.plugins import Plugins, build_plugin_manager

VALID = """
model: churn
window: {kind: sliding, duration: 30m, min_labelled_rows: 50}
schedule: {every: 1m}
metrics:
  - accuracy
  - {name: f1, params: {average: macro}, key: f1_m}
drift: {tests: [ks, psi], features: [age, plan], thresholds: {psi: 0.05}}
triggers:
  - {metric: accuracy, condition: relative_drop, threshold: 0.10, level: RED}
  - {metric: f1_m, condition: below, threshold: 0.6, level: amber}
  - {drift: any, condition: above, threshold: 1, level: AMBER}
actions: {AMBER: [notify], RED: [retrain, rollback, notify]}
notify: [{sink: record, config: {path: /tmp/x.jsonl}}]
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_plugins(Plugins(build_plugin_manager(env={})))


def problems(text: str, registry: Registry) -> list[str]:
    with pytest.raises(PlanError) as info:
        parse_plan(textwrap.dedent(text), registry)
    return info.value.problems


def test_valid_plan(registry: Registry) -> None:
    plan = parse_plan(VALID, registry)
    assert plan.model == "churn"
    assert plan.window.duration_seconds == 1800 and plan.window.min_labelled_rows == 50
    assert [m.result_key for m in plan.metrics] == ["accuracy", "f1_m"]
    assert plan.metrics[1].params == {"average": "macro"}
    assert plan.drift is not None and plan.drift.features == ("age", "plan")
    assert plan.triggers[1] == Trigger("below", 0.6, Level.AMBER, metric="f1_m")
    assert plan.actions[Level.RED] == ("retrain", "rollback", "notify")
    assert plan.notify[0].sink == "record"
    assert parse_plan(plan_to_yaml(plan), registry) == plan


def test_threshold_type_error_names_the_field(registry: Registry) -> None:
    got = problems(
        """
        model: m
        metrics: [accuracy]
        triggers: [{metric: accuracy, condition: below, threshold: abc, level: RED}]
        """,
        registry,
    )
    assert got == ["triggers[0].threshold: expected a number, got 'abc'"]


def test_every_problem_is_listed(registry: Registry) -> None:
    got = problems(
        """
        model: ""
        window: {kind: tumbling, rows: 0, min_labelled_rows: -1}
        schedule: {every: 0m}
        metrics: [accuracy, nope]
        drift: {tests: [ks, magic]}
        triggers:
          - {metric: missing, condition: below, threshold: 1, level: RED}
          - {drift: psi, condition: relative_drop, threshold: 2, level: GREEN}
          - {metric: accuracy, drift: ks, condition: sideways, threshold: 1, level: RED}
        actions: {RED: [explode], PURPLE: [notify]}
        notify: [{sink: carrier_pigeon}]
        colour: blue
        """,
        registry,
    )
    prefixes = {p.split(":")[0] for p in got}
    assert prefixes >= {
        "colour",
        "model",
        "window.kind",
        "window.rows",
        "window.min_labelled_rows",
        "schedule.every",
        "metrics[1]",
        "drift.tests[1]",
        "triggers[0].metric",
        "triggers[1].drift",
        "triggers[1].condition",
        "triggers[1].threshold",
        "triggers[1].level",
        "triggers[2]",
        "triggers[2].condition",
        "actions.RED[0]",
        "actions.PURPLE",
        "notify[0].sink",
    }
    assert any("unknown metric 'nope'" in p for p in got)


def test_zero_duration_rejected(registry: Registry) -> None:
    got = problems("model: m\nwindow: {duration: 0h}\n", registry)
    assert got == ["window.duration: must be greater than zero"]


def test_not_yaml_mapping(registry: Registry) -> None:
    assert problems("- a\n- b\n", registry) == ["<root>: expected a mapping, got list"]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_default_plans_validate_and_round_trip(registry: Registry, task: str) -> None:
    plan = default_plan("m", task)  # type: ignore[arg-type]
    assert parse_plan(plan_to_yaml(plan), registry) == plan
    names = {m.name for m in plan.metrics}
    assert ("accuracy" in names) == (task == "classification")
    assert ("rmse" in names) == (task == "regression")
    assert plan.actions[Level.RED] == ("retrain", "notify")


def test_durations() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert format_duration(5400) == "90m"
    assert format_duration(parse_duration("2w")) == "2w"
    with pytest.raises(ValueError):
        parse_duration("soon")
