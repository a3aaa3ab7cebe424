"""Pipelines that impute missing categories (the scikit-learn docs' ColumnTransformer example).

skl2onnx imputes a string column only for a string marker, and a string tensor has no null:
Cyclone converts the imputer to look for MISSING_CATEGORY (""), serves and logs that marker,
and gives scikit-learn NaN wherever it appears (parity check, retraining).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from cyclone.errors import InvalidArgument
from cyclone.models.convert import (
    import_pipeline,
    imputed_categorical_columns,
    missing_as_nan,
    onnx_feed,
)
from cyclone.models.registration import PROBES_FILE
from cyclone.models.repository import ModelRepository
from cyclone.models.schema import MISSING_CATEGORY
from services.inference.model import LoadedModel

NUMERIC = ["age", "income"]
CATEGORICAL = ["plan", "region"]


@pytest.fixture
def frame() -> pd.DataFrame:
    """Rows with NaN in numeric and categorical columns, as a CSV read by pandas gives them."""
    rng = np.random.default_rng(3)
    rows = 400
    data = pd.DataFrame(
        {
            "age": rng.uniform(18, 80, rows),
            "income": rng.lognormal(10.0, 0.5, rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows).astype(object),
            "region": rng.choice(["north", "south"], rows).astype(object),
        }
    )
    effect = data["plan"].map({"basic": 0.0, "plus": 1.0, "pro": 2.0}).to_numpy()
    data["churned"] = (effect + 0.02 * (data["age"] - 45) + rng.logistic(size=rows) > 1.0).astype(
        np.int64
    )
    data["amount"] = effect * 3 + 0.1 * data["age"] + rng.normal(0, 0.5, rows)
    data.loc[data.index % 9 == 0, "plan"] = np.nan
    data.loc[data.index % 13 == 0, "region"] = None
    data.loc[data.index % 11 == 0, "income"] = np.nan
    return data


def _pipeline(final: object, *, strict: bool = False, strategy: str = "constant") -> Pipeline:
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy=strategy, fill_value="missing")),
            ("encode", OneHotEncoder(handle_unknown="error" if strict else "ignore")),
        ]
    )
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    pre = ColumnTransformer([("num", numeric, NUMERIC), ("cat", categorical, CATEGORICAL)])
    return Pipeline([("pre", pre), ("model", final)])


def _request_columns(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The rows as a client sends them: floats (NaN for missing) and strings ("" for missing)."""
    columns = {n: rows[n].to_numpy(dtype=np.float64) for n in NUMERIC}
    for name in CATEGORICAL:
        columns[name] = rows[name].fillna(MISSING_CATEGORY).to_numpy(dtype=object)
    return columns


@pytest.mark.parametrize("strict", [False, True], ids=["ignore-unknown", "error-on-unknown"])
def test_imputed_categories_import_and_serve_like_scikit_learn(
    frame: pd.DataFrame, tmp_path: Path, strict: bool
) -> None:
    pipeline = _pipeline(LogisticRegression(max_iter=500), strict=strict, strategy="most_frequent")
    pipeline.fit(frame[NUMERIC + CATEGORICAL], frame["churned"])
    _, schema, report = import_pipeline(pipeline, "imputes", tmp_path, sample=frame)

    by_name = {f.name: f for f in schema.features}
    assert all(by_name[n].allow_missing for n in CATEGORICAL)
    assert report.label_agreement == 1.0
    served = LoadedModel(ModelRepository(tmp_path).files("imputes"))
    rows = frame.iloc[:60]
    assert rows[CATEGORICAL].isna().any().all()  # the rows exercise the marker
    columns = _request_columns(rows)
    assert served.validate(columns) == len(rows)
    outputs = served.predict(columns)
    assert outputs.probabilities is not None
    np.testing.assert_allclose(
        outputs.probabilities, pipeline.predict_proba(rows[NUMERIC + CATEGORICAL]), atol=1e-4
    )
    if strict:
        # The marker is accepted; a category the encoder never saw still is not.
        columns["plan"] = np.array(["gold", *columns["plan"][1:]], dtype=object)
        with pytest.raises(InvalidArgument, match=r"features\.plan: row 0 has unknown category"):
            served.validate(columns)


def test_probes_and_reference_use_the_marker_not_nan(frame: pd.DataFrame, tmp_path: Path) -> None:
    pipeline = _pipeline(Ridge()).fit(frame[NUMERIC + CATEGORICAL], frame["amount"])
    target, _, _ = import_pipeline(
        pipeline, "probed", tmp_path, sample=frame, label_column="amount"
    )
    probes = json.loads((target / PROBES_FILE).read_text())
    plans = [row["plan"] for row in probes["rows"]]
    assert MISSING_CATEGORY in plans
    assert not {"nan", "None"} & set(plans)
    reference = json.loads((target / "reference.json").read_text())
    assert "nan" not in json.dumps(reference["features"]["plan"])
    # A served probe row reproduces its recorded answer.
    served = LoadedModel(ModelRepository(tmp_path).files("probed"))
    rows = pd.DataFrame.from_records(probes["rows"])
    outputs = served.predict(_request_columns(rows.replace({MISSING_CATEGORY: None})))
    assert outputs.values is not None
    recorded = [answer["value"] for answer in probes["outputs"]]
    np.testing.assert_allclose(outputs.values, recorded, rtol=1e-4, atol=1e-4)


def test_a_retrained_clone_is_fitted_on_nan_where_logs_say_missing(frame: pd.DataFrame) -> None:
    """Logged rows carry the marker; the refit family's clone (unfitted) still says which
    columns its imputer covers, and fitting on those rows with NaN restored matches fitting
    on the original frame."""
    champion = _pipeline(LogisticRegression(max_iter=500))
    x = frame[NUMERIC + CATEGORICAL]
    champion.fit(x, frame["churned"])
    challenger = clone(champion)
    assert imputed_categorical_columns(challenger) == CATEGORICAL
    assert imputed_categorical_columns(champion) == CATEGORICAL
    logged = x.assign(**{n: x[n].fillna(MISSING_CATEGORY) for n in CATEGORICAL})
    restored = missing_as_nan(logged, imputed_categorical_columns(challenger))
    assert restored[CATEGORICAL].isna().sum().tolist() == x[CATEGORICAL].isna().sum().tolist()
    challenger.fit(restored, frame["churned"])
    np.testing.assert_allclose(challenger.predict_proba(x), champion.predict_proba(x))


def test_pipelines_without_a_categorical_imputer_are_unchanged(frame: pd.DataFrame) -> None:
    """No imputer: no marker (an OrdinalEncoder branch, and the all-numeric matrix layout)."""
    pre = ColumnTransformer(
        [("num", SimpleImputer(), NUMERIC), ("cat", OrdinalEncoder(), ["region"])]
    )
    complete = frame.dropna(subset=["region"])
    pipeline = Pipeline([("pre", pre), ("model", Ridge())]).fit(
        complete[[*NUMERIC, "region"]], complete["amount"]
    )
    assert imputed_categorical_columns(pipeline) == []
    assert imputed_categorical_columns(Ridge()) == []
    assert missing_as_nan(complete, []) is complete


def test_onnx_feed_marks_missing_only_for_imputed_categories(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    pipeline = _pipeline(Ridge()).fit(frame[NUMERIC + CATEGORICAL], frame["amount"])
    _, schema, _ = import_pipeline(pipeline, "feed", tmp_path, sample=frame)
    feed = onnx_feed(schema, frame.iloc[:20])
    assert feed["plan"][0, 0] == MISSING_CATEGORY  # row 0 is missing in the fixture
    assert np.isnan(feed["income"][0, 0])


@pytest.mark.parametrize(
    ("marker", "marked"), [("", True), ("?", False)], ids=["cyclones-marker", "own-marker"]
)
def test_an_imputer_with_a_string_marker_converts_as_it_is(
    frame: pd.DataFrame, tmp_path: Path, marker: str, marked: bool
) -> None:
    """A pipeline fitted with "" as its missing value already speaks Cyclone's marker; one with
    its own ("?") keeps it, and "" is then an ordinary (unknown) category."""
    data = frame.assign(plan=frame["plan"].fillna(marker), region=frame["region"].fillna("north"))
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(missing_values=marker, strategy="most_frequent")),
            ("encode", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    pre = ColumnTransformer(
        [("num", SimpleImputer(strategy="median"), NUMERIC), ("cat", categorical, ["plan"])]
    )
    pipeline = Pipeline([("pre", pre), ("model", Ridge())])
    pipeline.fit(data[[*NUMERIC, "plan"]], data["amount"])
    _, schema, _ = import_pipeline(pipeline, "own", tmp_path, sample=data)
    assert {f.name: f.allow_missing for f in schema.features}["plan"] is marked
    assert imputed_categorical_columns(pipeline) == []  # scikit-learn gets the rows as they are
    served = LoadedModel(ModelRepository(tmp_path).files("own"))
    rows = data.iloc[:30]
    columns = {n: rows[n].to_numpy(dtype=np.float64) for n in NUMERIC}
    columns["plan"] = rows["plan"].to_numpy(dtype=object)
    outputs = served.predict(columns)
    assert outputs.values is not None
    np.testing.assert_allclose(
        outputs.values, pipeline.predict(rows[[*NUMERIC, "plan"]]), rtol=1e-4, atol=1e-3
    )
