"""Known-answer probes without servers: what import writes, the plan's `probes:` section, the
comparison of answers and how a probe round changes an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from cyclone.models.convert import import_pipeline
from cyclone.plan import PlanError, ProbesSpec, parse_plan, plan_to_yaml
from cyclone.plugin_api import Level, MetricResult
from services.monitor.evaluate import Evaluation, ProbeSummary, with_probes
from services.monitor.probes import differences


def _regressor() -> LinearRegression:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2))
    return LinearRegression().fit(x, x @ [1.0, 2.0])


def test_import_without_sample_keeps_synthetic_rows_with_the_models_answers(
    tmp_path: Path,
) -> None:
    model = _regressor()
    directory, _, _ = import_pipeline(model, "reg", tmp_path)
    probes = json.loads((directory / "probes.json").read_text())
    assert len(probes["rows"]) == 20
    rows = pd.DataFrame(probes["rows"])[["f0", "f1"]].to_numpy()
    recorded = [o["value"] for o in probes["outputs"]]
    assert np.allclose(recorded, model.predict(rows), atol=1e-4)


def test_import_with_a_short_sample_keeps_its_rows_and_missing_values_as_null(
    tmp_path: Path,
) -> None:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [0.5, 1.0, 1.5, 2.0]})
    pipeline = make_pipeline(SimpleImputer(), LinearRegression()).fit(frame, [1.0, 2.0, 3.0, 4.0])
    directory, _, _ = import_pipeline(pipeline, "short", tmp_path, sample=frame)
    probes = json.loads((directory / "probes.json").read_text())
    assert [r["a"] for r in probes["rows"]] == [1.0, None, 3.0, 4.0]
    assert len(probes["outputs"]) == 4


PLAN = "model: m\n"


def test_probes_section_parses_and_round_trips() -> None:
    plan = parse_plan(PLAN + "probes: {every: 30s, tolerance: 0.001, address: 'envoy:8080'}\n")
    assert plan.probes == ProbesSpec(30, 0.001, "envoy:8080")
    assert parse_plan(plan_to_yaml(plan)).probes == plan.probes
    assert parse_plan(PLAN).probes == ProbesSpec()


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("{every: soon}", "probes.every"),
        ("{tolerance: -1}", "probes.tolerance"),
        ("{tolerance: a lot}", "probes.tolerance"),
        ("{address: 'no port'}", "probes.address"),
        ("{address: 8080}", "probes.address"),
        ("{adress: 'x:1'}", "probes.adress"),
        ("[every]", "probes"),
    ],
)
def test_bad_probes_sections_name_the_field(section: str, field: str) -> None:
    with pytest.raises(PlanError) as err:
        parse_plan(PLAN + f"probes: {section}\n")
    assert any(p.startswith(f"{field}:") for p in err.value.problems), err.value.problems


def test_differences_name_rows_and_respect_the_tolerance() -> None:
    recorded = [{"value": 1.0}, {"value": 2.0}]
    assert differences(recorded, [{"value": 1.00001}, {"value": 2.0}], 1e-4) == []
    assert differences(recorded, [{"value": 1.0}, {"value": 2.5}], 1e-4) == [
        "row 1: value 2.5, recorded 2"
    ]
    labelled = [{"label": "a", "probabilities": [0.9, 0.1]}]
    assert differences(labelled, [{"label": "b", "probabilities": [0.1, 0.9]}], 1e-4) == [
        "row 0: label 'b', recorded 'a'"
    ]
    assert differences(labelled, [{"label": "a", "probabilities": [0.8, 0.2]}], 1e-4) == [
        "row 0: probabilities differ by 0.1 (tolerance 0.0001)"
    ]
    assert differences(labelled, [], 1e-4) == ["0 answers for 1 rows"]


def _green() -> Evaluation:
    return Evaluation(Level.GREEN, (), (), {"accuracy": MetricResult.ok(0.9)})


def test_probe_rounds_raise_the_level_and_report_uptime() -> None:
    plan = parse_plan(PLAN + "actions: {AMBER: [notify], RED: [retrain, notify]}\n")
    assert with_probes(_green(), None, plan) == _green()
    right = with_probes(_green(), ProbeSummary(4, 4), plan)
    assert right.level is Level.GREEN and right.metrics["uptime"].value == 1.0
    wrong = with_probes(_green(), ProbeSummary(4, 4, wrong=("probes: row 0 ...",)), plan)
    assert wrong.level is Level.RED and wrong.reasons == ("probes: row 0 ...",)
    assert wrong.actions == ("notify",)  # a serving fault: retraining would not mend it
    down = with_probes(_green(), ProbeSummary(4, 3, error="probes: no answer"), plan)
    assert down.level is Level.AMBER and down.actions == ("notify",)
    assert down.metrics["uptime"].value == 0.75
    red = Evaluation(Level.RED, ("accuracy fell",), ("retrain",), {})
    kept = with_probes(red, ProbeSummary(1, 0, error="probes: no answer"), plan)
    assert kept.level is Level.RED and kept.reasons == ("accuracy fell", "probes: no answer")
