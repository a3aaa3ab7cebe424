"""The `rollout:` plan section: defaults, round trip, and bad input naming the field."""

from __future__ import annotations

import pytest

from cyclone.plan import PlanError, Registry, parse_plan, plan_to_yaml
from cyclone.rollout_plan import RolloutSpec, parse_rollout, rollout_to_dict

REGISTRY = Registry({"accuracy": object()}, {}, {})


def test_absent_section_gives_working_defaults() -> None:
    plan = parse_plan("model: m\n", REGISTRY)
    assert plan.rollout == RolloutSpec()
    assert plan.rollout.strategy == "canary" and plan.rollout.steps[-1] == 100
    assert plan.rollout.deadline_seconds <= 300  # seconds to minutes on one machine, not hours
    assert "rollout" not in plan_to_yaml(plan)


def test_section_round_trips() -> None:
    raw = {
        "strategy": "red_black",
        "steps": [5, 25, 50, 100],
        "step_duration": "30s",
        "deadline": "2m",
        "interval": "500ms",
        "on_deadline": "hold",
        "analysis": {"failure_limit": 3, "quality_metric": "mae", "significance": 0.01},
        "red_black": {"keep_old_for": "1m"},
        "shadow": {"mirror_percent": 25, "promote_if": "better"},
    }
    spec = parse_rollout(raw)
    assert spec.red_black.keep_old_for_seconds == 60 and spec.interval_seconds == 0.5
    assert parse_rollout(rollout_to_dict(spec)) == spec
    # Estimated-then-confirmed: off by a boolean, promote outright with a zero confirmation.
    off = parse_rollout({"confirm": 0, "analysis": {"estimates": False}})
    assert off.confirm_seconds == 0 and off.analysis.estimates is False
    assert parse_rollout(rollout_to_dict(off)) == off
    assert parse_rollout({"confirm": "5m"}).confirm_seconds == 300
    plan = parse_plan("model: m\nrollout:\n  strategy: shadow\n", REGISTRY)
    assert parse_plan(plan_to_yaml(plan), REGISTRY) == plan


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"strategy": "rainbow"}, "rollout.strategy: expected one of"),
        ({"steps": [50, 25, 100]}, "rollout.steps[1]: steps must increase"),
        ({"steps": [10, 50]}, "rollout.steps: the last step must be 100"),
        ({"steps": [0, 100]}, "rollout.steps[0]: expected an integer percentage"),
        ({"steps": "10,100"}, "rollout.steps: expected a non-empty list"),
        ({"step_duration": "soon"}, "rollout.step_duration: expected a duration"),
        ({"deadline": "5s", "step_duration": "10s"}, "rollout.deadline: must not be shorter"),
        ({"on_deadline": "panic"}, "rollout.on_deadline: expected one of"),
        ({"min_requests": -1}, "rollout.min_requests: must be at least 0"),
        ({"replicas": 1.5}, "rollout.replicas: expected an integer"),
        ({"analysis": {"failure_limit": 0}}, "rollout.analysis.failure_limit: must be at least 1"),
        ({"analysis": {"significance": 0.9}}, "rollout.analysis.significance: must be in"),
        ({"analysis": {"quality_metric": "f2"}}, "rollout.analysis.quality_metric: expected"),
        ({"analysis": {"max_p99_latency_ratio": 0.5}}, "rollout.analysis.max_p99_latency_ratio"),
        ({"analysis": {"bogus": 1}}, "rollout.analysis.bogus: unknown field"),
        ({"shadow": {"mirror_percent": 0}}, "rollout.shadow.mirror_percent: must be in"),
        ({"red_black": {"keep_old_for": 0}}, "rollout.red_black.keep_old_for: must be greater"),
        ({"blue_green": {"smoke_requests": 0}}, "rollout.blue_green.smoke_requests: must be at"),
        ({"confirm": "soon"}, "rollout.confirm: expected a duration"),
        ({"confirm": -5}, "rollout.confirm: must be greater than zero"),
        ({"analysis": {"estimates": "yes"}}, "rollout.analysis.estimates: expected true or false"),
        ({"colour": "blue"}, "rollout.colour: unknown field"),
        ("canary", "rollout: expected a mapping"),
    ],
)
def test_bad_input_names_the_field(raw: object, message: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_rollout(raw)
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_plan_reports_rollout_problems_with_the_others() -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(
            "model: m\nwindow: {kind: odd}\nrollout: {strategy: x, steps: [100, 5]}\n", REGISTRY
        )
    problems = info.value.problems
    assert any(p.startswith("window.kind") for p in problems)
    assert any(p.startswith("rollout.strategy") for p in problems)
    assert any(p.startswith("rollout.steps[1]") for p in problems)
