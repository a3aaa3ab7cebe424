"""Importing what users bring: the common estimator families, plain or in a pipeline.

Plain estimators and pipelines without a ColumnTransformer take one float [N, F] tensor
("matrix" layout) whatever they were fitted on; ColumnTransformer pipelines with categorical
columns take one tensor per feature. Every import goes through the parity check on real rows,
and the served model (the inference service's LoadedModel) still takes named features.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, RegressorMixin, clone, is_classifier
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
    VotingClassifier,
)
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, RidgeClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, LinearSVC

from cyclone.errors import ModelLoadError, NotFound
from cyclone.models.convert import ConversionError, import_pipeline
from cyclone.models.repository import PIPELINE_FILE, ModelRepository, load_pipeline
from cyclone.models.schema import read_schema
from services.inference.model import LoadedModel

NUMERIC = ["age", "income", "visits", "is_member"]
FEATURES = [*NUMERIC, "plan"]

# Few trees and iterations: the point is the converter, not the fit.
FAMILIES: dict[str, Callable[[], Any]] = {
    "hist_gb_classifier": lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
    "hist_gb_regressor": lambda: HistGradientBoostingRegressor(max_iter=10, random_state=0),
    "gb_classifier": lambda: GradientBoostingClassifier(n_estimators=10, random_state=0),
    "gb_regressor": lambda: GradientBoostingRegressor(n_estimators=10, random_state=0),
    "rf_classifier": lambda: RandomForestClassifier(n_estimators=5, max_depth=6, random_state=0),
    "rf_regressor": lambda: RandomForestRegressor(n_estimators=5, max_depth=6, random_state=0),
    "et_classifier": lambda: ExtraTreesClassifier(n_estimators=5, max_depth=6, random_state=0),
    "et_regressor": lambda: ExtraTreesRegressor(n_estimators=5, max_depth=6, random_state=0),
    "logistic_regression": lambda: LogisticRegression(max_iter=500),
    "linear_regression": LinearRegression,
    "ridge": lambda: Ridge(alpha=1.0),
}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Numeric columns of several dtypes (float, int counts, a 0/1 flag) and one category."""
    rng = np.random.default_rng(7)
    rows = 300
    data = pd.DataFrame(
        {
            "age": rng.uniform(18, 80, rows).round(0),
            "income": rng.lognormal(10.0, 0.5, rows),
            "visits": rng.poisson(3, rows).astype(np.int64),
            "is_member": (rng.uniform(size=rows) < 0.3).astype(np.int64),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
        }
    )
    plan_effect = data["plan"].map({"basic": 0.0, "plus": 0.5, "pro": 1.0}).to_numpy()
    score = (
        0.03 * (data["age"] - 45) + 0.3 * data["visits"] - data["is_member"] + plan_effect
    ).to_numpy()
    data["amount"] = score + rng.normal(0, 0.3, rows)
    data["churned"] = (score + rng.logistic(size=rows) > 1.0).astype(np.int64)
    data["tier"] = np.digitize(score, [0.0, 1.5]).astype(np.int64)  # three classes
    return data


def _target(model: Any) -> str:
    return "churned" if is_classifier(model) else "amount"


def _onnx_inputs(target: Path) -> list[tuple[str, list[Any]]]:
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    return [(i.name, list(i.shape)) for i in session.get_inputs()]


def _served(tmp_path: Path, name: str) -> LoadedModel:
    return LoadedModel(ModelRepository(tmp_path).files(name))


def _assert_served_like_sklearn(
    model: LoadedModel, pipeline: Any, x: Any, columns: dict[str, np.ndarray]
) -> None:
    """The inference service, fed named columns, predicts what scikit-learn predicts.

    Rows whose input sits on a tree split within float32 rounding may go down the other
    branch (the parity check excuses exactly those), so most rows, not all, must agree.
    """
    outputs = model.predict(columns)
    if is_classifier(pipeline):
        assert outputs.probabilities is not None and outputs.labels is not None
        diff = np.abs(outputs.probabilities - pipeline.predict_proba(x)).max(axis=1)
        close = diff <= 1e-4
    else:
        assert outputs.values is not None
        expected = pipeline.predict(x)
        close = np.abs(outputs.values - expected) <= 1e-3 * np.std(expected) + 1e-4
    assert close.mean() >= 0.9, f"{(~close).sum()} of {len(close)} rows differ"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_estimator_on_dataframe(family: str, frame: pd.DataFrame, tmp_path: Path) -> None:
    model = FAMILIES[family]().fit(frame[NUMERIC], frame[_target(FAMILIES[family]())])
    target, schema, report = import_pipeline(model, family, tmp_path, sample=frame)
    assert schema.input_layout == "matrix"
    assert schema.feature_names == NUMERIC
    assert schema.task == ("classification" if is_classifier(model) else "regression")
    assert _onnx_inputs(target) == [("input", [None, len(NUMERIC)])]
    assert report.rows == len(frame)
    assert read_schema(target / "model.yaml").feature_names == NUMERIC
    assert schema.extra["fit_input"] == "dataframe"
    assert schema.extra["feature_dtypes"] == {
        "age": "float64",
        "income": "float64",
        "visits": "int64",
        "is_member": "int64",
    }
    rows = frame.iloc[:25]
    columns = {n: rows[n].to_numpy(dtype=np.float64) for n in NUMERIC}
    _assert_served_like_sklearn(_served(tmp_path, family), model, rows[NUMERIC], columns)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pipeline_on_numpy_array_with_feature_names(
    family: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    x = frame[NUMERIC].to_numpy(dtype=np.float64)
    pipeline = Pipeline([("scale", StandardScaler()), ("model", FAMILIES[family]())])
    pipeline.fit(x, frame[_target(pipeline)])
    target, schema, _ = import_pipeline(
        pipeline, family, tmp_path, sample=frame, feature_names=NUMERIC
    )
    assert schema.input_layout == "matrix"
    assert schema.feature_names == NUMERIC
    assert schema.extra["fit_input"] == "array"
    assert _onnx_inputs(target) == [("input", [None, len(NUMERIC)])]
    columns = {n: frame[n].to_numpy(dtype=np.float64)[:25] for n in NUMERIC}
    _assert_served_like_sklearn(_served(tmp_path, family), pipeline, x[:25], columns)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_column_transformer_with_categorical_column(
    family: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), NUMERIC),
            # Dense output: HistGradientBoosting refuses sparse input.
            ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["plan"]),
        ]
    )
    pipeline = Pipeline([("pre", pre), ("model", FAMILIES[family]())])
    pipeline.fit(frame[FEATURES], frame[_target(pipeline)])
    target, schema, report = import_pipeline(pipeline, family, tmp_path, sample=frame)
    assert schema.input_layout == "columns"
    assert schema.feature_names == FEATURES
    assert [name for name, _ in _onnx_inputs(target)] == FEATURES
    assert {f.name: f.kind for f in schema.features}["plan"] == "categorical"
    assert report.rows == len(frame)
    rows = frame.iloc[:25]
    columns: dict[str, np.ndarray] = {n: rows[n].to_numpy(dtype=np.float64) for n in NUMERIC}
    columns["plan"] = rows["plan"].to_numpy(dtype=object)
    _assert_served_like_sklearn(_served(tmp_path, family), pipeline, rows[FEATURES], columns)


@pytest.mark.parametrize(
    "family", ["hist_gb_classifier", "gb_classifier", "rf_classifier", "logistic_regression"]
)
def test_multiclass(family: str, frame: pd.DataFrame, tmp_path: Path) -> None:
    model = Pipeline([("scale", StandardScaler()), ("model", FAMILIES[family]())])
    model.fit(frame[NUMERIC], frame["tier"])
    _, schema, report = import_pipeline(model, family, tmp_path, sample=frame)
    assert schema.class_labels == ("0", "1", "2")
    assert report.label_agreement > 0.99


def test_column_names_that_are_not_identifiers_stay_the_inputs_names(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    """skl2onnx renames "monthly income" to an identifier; the model Cyclone writes takes the
    column's own name, which requests and model.yaml use."""
    renamed = frame.rename(columns={"income": "monthly income", "plan": "plan-type"})
    numeric = ["age", "monthly income", "visits", "is_member"]
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["plan-type"]),
        ]
    )
    pipeline = Pipeline([("pre", pre), ("model", Ridge())])
    pipeline.fit(renamed[[*numeric, "plan-type"]], renamed["amount"])
    target, schema, _ = import_pipeline(pipeline, "spaced", tmp_path, sample=renamed)
    assert schema.feature_names == [*numeric, "plan-type"]
    assert [name for name, _ in _onnx_inputs(target)] == [*numeric, "plan-type"]
    rows = renamed.iloc[:25]
    columns: dict[str, np.ndarray] = {n: rows[n].to_numpy(dtype=np.float64) for n in numeric}
    columns["plan-type"] = rows["plan-type"].to_numpy(dtype=object)
    served = _served(tmp_path, "spaced")
    assert served.validate(columns) == len(rows)
    _assert_served_like_sklearn(served, pipeline, rows[[*numeric, "plan-type"]], columns)


def test_a_column_named_like_an_output_is_refused_by_name(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    renamed = frame.rename(columns={"age": "probabilities"})
    pre = ColumnTransformer(
        [("num", StandardScaler(), ["probabilities"]), ("cat", OneHotEncoder(), ["plan"])]
    )
    pipeline = Pipeline([("pre", pre), ("model", LogisticRegression())])
    pipeline.fit(renamed[["probabilities", "plan"]], renamed["churned"])
    with pytest.raises(ConversionError, match=r"^feature_names: 'probabilities' is also the name"):
        import_pipeline(pipeline, "clash", tmp_path, sample=renamed)


@pytest.mark.parametrize("family", ["logistic_regression", "rf_classifier", "gb_classifier"])
def test_boolean_class_labels_are_served_as_labels(
    family: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    """Fitted on a bool target, skl2onnx would answer the class index (0/1); Cyclone serves
    "False"/"True", the labels model.yaml lists."""
    model = FAMILIES[family]().fit(frame[NUMERIC], frame["churned"].astype(bool))
    _, schema, report = import_pipeline(model, family, tmp_path, sample=frame)
    assert schema.class_labels == ("False", "True")
    assert report.label_agreement == 1.0
    rows = frame.iloc[:40]
    outputs = _served(tmp_path, family).predict(
        {n: rows[n].to_numpy(dtype=np.float64) for n in NUMERIC}
    )
    assert outputs.labels is not None
    assert outputs.labels.tolist() == [str(v) for v in model.predict(rows[NUMERIC])]


def test_without_sample_uses_synthetic_rows(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = RandomForestRegressor(n_estimators=5, random_state=0).fit(
        frame[NUMERIC], frame["amount"]
    )
    _, schema, report = import_pipeline(model, "rf", tmp_path)
    assert schema.feature_names == NUMERIC and schema.input_layout == "matrix"
    assert report.rows > 0
    assert "feature_dtypes" not in schema.extra


# -- refusals -------------------------------------------------------------------------------


def _manhattan(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).sum())


class _MedianRegressor(RegressorMixin, BaseEstimator):
    """A fitted regressor skl2onnx has no converter for."""

    def fit(self, x: Any, y: Any) -> _MedianRegressor:
        self.median_ = float(np.median(y))
        self.n_features_in_ = np.asarray(x).shape[1]
        return self

    def predict(self, x: Any) -> np.ndarray:
        return np.full(len(x), self.median_)


def test_knn_with_custom_metric_refused_naming_the_step(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("knn", KNeighborsClassifier(metric=_manhattan))]
    )
    pipeline.fit(frame[NUMERIC], frame["churned"])
    with pytest.raises(
        ConversionError,
        match=r"^pipeline: skl2onnx cannot convert step 'knn' \(KNeighborsClassifier\): .*metric",
    ):
        import_pipeline(pipeline, "knn", tmp_path, sample=frame)
    assert not (tmp_path / "knn").exists() or not any((tmp_path / "knn").iterdir())


def test_estimator_without_converter_refused_naming_the_step(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    pre = ColumnTransformer([("num", StandardScaler(), NUMERIC)])
    pipeline = Pipeline([("pre", pre), ("median", _MedianRegressor())])
    pipeline.fit(frame[NUMERIC], frame["amount"])
    with pytest.raises(
        ConversionError,
        match=r"^pipeline: skl2onnx cannot convert step 'median' \(_MedianRegressor\): ",
    ):
        import_pipeline(pipeline, "median", tmp_path)


@pytest.mark.parametrize(
    ("model", "where"),
    [
        (lambda: LinearSVC(), "LinearSVC"),
        (lambda: RidgeClassifier(), "RidgeClassifier"),
        (lambda: Pipeline([("scale", StandardScaler()), ("svm", SVC())]), r"step 'svm' \(SVC\)"),
    ],
    ids=["linear_svc", "ridge_classifier", "svc_without_probability"],
)
def test_classifier_without_probabilities_refused_naming_the_step(
    frame: pd.DataFrame, tmp_path: Path, model: Callable[[], Any], where: str
) -> None:
    fitted = model().fit(frame[NUMERIC], frame["churned"])
    with pytest.raises(
        ConversionError,
        match=rf"^pipeline: {where} gives no class probabilities .*CalibratedClassifierCV",
    ):
        import_pipeline(fitted, "noproba", tmp_path, sample=frame)
    assert not (tmp_path / "noproba").exists() or not any((tmp_path / "noproba").iterdir())


def test_calibrated_margin_classifier_imports_with_probabilities(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    """What the refusal above suggests works: the wrapped classifier imports and its served
    probabilities match scikit-learn's."""
    model = CalibratedClassifierCV(LinearSVC()).fit(frame[NUMERIC], frame["churned"])
    directory, schema, parity = import_pipeline(model, "calibrated", tmp_path, sample=frame)
    assert schema.task == "classification"
    assert parity.label_agreement == 1.0
    session = ort.InferenceSession(str(directory / "model.onnx"))
    _, probabilities = session.run(None, {"input": frame[NUMERIC].to_numpy(np.float32)})
    np.testing.assert_allclose(
        probabilities, model.predict_proba(frame[NUMERIC]), rtol=0, atol=1e-5
    )


def test_native_categorical_hist_gradient_boosting_refused(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    x = frame[[*NUMERIC, "plan"]].astype({"plan": "category"})
    model = Pipeline(
        [("hgb", HistGradientBoostingRegressor(max_iter=5, categorical_features="from_dtype"))]
    )
    model.fit(x, frame["amount"])
    with pytest.raises(
        ConversionError,
        match=r"^pipeline: skl2onnx cannot convert step 'hgb' \(HistGradientBoostingRegressor\): "
        r"its categorical_features are not supported; encode those columns with OneHotEncoder",
    ):
        import_pipeline(model, "hgb", tmp_path)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], r"^feature_names: 2 names given, the pipeline takes 4 features"),
        (["a", "b", "a", "c"], r"^feature_names: duplicate names"),
        (["a", "b", " c", "d"], r"^feature_names: ' c' is not a usable feature name"),
    ],
)
def test_bad_feature_names_refused(
    names: list[str], message: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    model = LinearRegression().fit(frame[NUMERIC].to_numpy(), frame["amount"])
    with pytest.raises(ConversionError, match=message):
        import_pipeline(model, "lin", tmp_path, feature_names=names)
    assert not (tmp_path / "lin").exists()


def test_feature_names_must_match_dataframe_columns(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = LinearRegression().fit(frame[NUMERIC], frame["amount"])
    with pytest.raises(ConversionError, match=r"^feature_names: the pipeline was fitted on"):
        import_pipeline(model, "lin", tmp_path, feature_names=["a", "b", "c", "d"])
    # The same names as the DataFrame's are accepted.
    _, schema, _ = import_pipeline(model, "lin", tmp_path, feature_names=NUMERIC)
    assert schema.feature_names == NUMERIC


# -- the saved pipeline ---------------------------------------------------------------------


def test_saved_pipeline_round_trips_and_refits(frame: pd.DataFrame, tmp_path: Path) -> None:
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("rf", RandomForestClassifier(n_estimators=7, max_depth=4))]
    )
    pipeline.fit(frame[NUMERIC], frame["churned"])
    target, _, _ = import_pipeline(pipeline, "churn", tmp_path, sample=frame)
    assert (target / PIPELINE_FILE).is_file()
    files = ModelRepository(tmp_path).files("churn")
    loaded = load_pipeline(files)
    np.testing.assert_array_equal(
        loaded.predict_proba(frame[NUMERIC]), pipeline.predict_proba(frame[NUMERIC])
    )
    # A trainer clones it with its hyperparameters and refits on new data.
    fresh = clone(loaded)
    assert fresh.get_params()["rf__n_estimators"] == 7
    assert fresh.get_params()["rf__max_depth"] == 4
    fresh.fit(frame[NUMERIC].iloc[::2], frame["churned"].iloc[::2])
    assert fresh.predict(frame[NUMERIC]).shape == (len(frame),)


def test_saved_pipeline_checksum_and_absence(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = LinearRegression().fit(frame[NUMERIC], frame["amount"])
    target, _, _ = import_pipeline(model, "lin", tmp_path)
    files = ModelRepository(tmp_path).files("lin")
    (target / PIPELINE_FILE).write_bytes((target / PIPELINE_FILE).read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="checksum differs from pipeline_sha256"):
        load_pipeline(files)
    (target / PIPELINE_FILE).unlink()
    with pytest.raises(NotFound, match=r"^pipeline: 'lin' version '1' has no pipeline.joblib"):
        load_pipeline(files)


def test_served_probabilities_stay_within_zero_and_one(tmp_path: Path) -> None:
    """Twenty trees' float32 average of pure leaves comes out at -1.2e-07 and 1.0000001 in
    onnxruntime; what the inference service answers is a probability."""
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(300, 3)), columns=["a", "b", "c"])
    model = RandomForestClassifier(20, random_state=0).fit(x, (x["a"] > 0).astype(int))
    target, _, _ = import_pipeline(model, "pure", tmp_path, sample=x)
    raw = ort.InferenceSession(str(target / "model.onnx")).run(
        None, {"input": x.to_numpy(np.float32)}
    )[1]
    assert raw.min() < 0.0 < 1.0 < raw.max()  # the case this test is about
    served = _served(tmp_path, "pure")
    outputs = served.predict({n: x[n].to_numpy(dtype=np.float64) for n in x.columns})
    assert outputs.probabilities is not None
    assert outputs.probabilities.min() >= 0.0 and outputs.probabilities.max() <= 1.0
    assert outputs.raw["probabilities"].min() >= 0.0  # the OIP tensor too
    np.testing.assert_allclose(outputs.probabilities, model.predict_proba(x), atol=1e-6)


def test_a_fitted_search_imports_its_best_estimator(frame: pd.DataFrame, tmp_path: Path) -> None:
    """Users save the GridSearchCV itself; what it predicts with is best_estimator_."""
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), NUMERIC),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["plan"]),
        ]
    )
    search = GridSearchCV(
        Pipeline([("pre", pre), ("model", LogisticRegression(max_iter=500))]),
        {"model__C": [0.1, 1.0]},
        cv=3,
    ).fit(frame[FEATURES], frame["churned"])
    _, schema, report = import_pipeline(search, "searched", tmp_path, sample=frame)
    assert schema.input_layout == "columns"
    assert report.label_agreement == 1.0
    assert type(load_pipeline(ModelRepository(tmp_path).files("searched"))) is Pipeline
    unrefit = GridSearchCV(Ridge(), {"alpha": [1.0]}, refit=False, cv=3)
    unrefit.fit(frame[NUMERIC], frame["amount"])
    with pytest.raises(
        ConversionError, match=r"^pipeline: GridSearchCV was fitted with refit=False"
    ):
        import_pipeline(unrefit, "unrefit", tmp_path)


def test_soft_voting_imports_and_hard_voting_is_refused(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    members = [
        ("lr", LogisticRegression(max_iter=500)),
        ("rf", RandomForestClassifier(5, max_depth=4, random_state=0)),
    ]
    soft = VotingClassifier(members, voting="soft").fit(frame[NUMERIC], frame["churned"])
    _, _, report = import_pipeline(soft, "soft", tmp_path, sample=frame)
    assert report.label_agreement == 1.0
    hard = VotingClassifier(members).fit(frame[NUMERIC], frame["churned"])
    with pytest.raises(ConversionError, match=r"gives no class probabilities.*voting='soft'"):
        import_pipeline(hard, "hard", tmp_path, sample=frame)
