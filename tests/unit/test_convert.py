"""scikit-learn → ONNX import: schema inference, layout, parity check and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import cyclone.models.convert as convert
from cyclone.models.convert import ConversionError, import_pipeline, infer_features
from cyclone.models.repository import ModelRepository, sha256_of
from cyclone.models.schema import read_schema
from cyclone_app.examples import CITIES, CREDIT_FEATURES, credit_frame


def _classifier(
    frame: pd.DataFrame, handle_unknown: str = "ignore", impute: bool = False
) -> Pipeline:
    numeric: Any = StandardScaler()
    if impute:
        numeric = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())])
    pre = ColumnTransformer(
        [
            ("num", numeric, ["age", "income", "debt_ratio"]),
            ("cat", OneHotEncoder(handle_unknown=handle_unknown), ["city"]),
        ]
    )
    pipeline = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=300))])
    pipeline.fit(frame[CREDIT_FEATURES], frame["defaulted"])
    return pipeline


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return credit_frame(300, seed=3)


@pytest.fixture(scope="module")
def numpy_regressor() -> tuple[LinearRegression, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0, 0.0]) + 4.0
    return LinearRegression().fit(x, y), x


def test_classifier_columns_layout_without_category_limits(
    frame: pd.DataFrame, tmp_path: Path
) -> None:
    pipeline = _classifier(frame, handle_unknown="ignore")
    target, schema, report = import_pipeline(pipeline, "credit", tmp_path, sample=frame)
    assert target == tmp_path / "credit" / "1"
    assert schema.input_layout == "columns"
    assert schema.task == "classification"
    assert schema.feature_names == CREDIT_FEATURES
    kinds = {f.name: (f.kind, f.dtype) for f in schema.features}
    assert kinds == {
        "age": ("numeric", "float32"),
        "income": ("numeric", "float32"),
        "debt_ratio": ("numeric", "float32"),
        "city": ("categorical", "string"),
    }
    # handle_unknown='ignore': unseen cities must still reach the model.
    assert all(f.categories == () for f in schema.features)
    assert schema.class_labels == ("0", "1")
    assert report.rows == len(frame)
    assert report.max_abs_diff < 1e-3
    assert report.label_agreement > 0.99
    # What is on disk is what was returned, with the model's checksum.
    on_disk = read_schema(target / "model.yaml")
    assert on_disk.feature_names == CREDIT_FEATURES
    assert on_disk.extra["sha256"] == sha256_of(target / "model.onnx")
    assert on_disk.extra["parity"]["rows"] == len(frame)
    assert ModelRepository(tmp_path).versions("credit") == ["1"]
    assert not [p for p in (tmp_path / "credit").iterdir() if p.name.startswith(".")], (
        "staging dir left"
    )


def test_categories_enforced_only_when_encoder_rejects_unknown(frame: pd.DataFrame) -> None:
    strict = _classifier(frame, handle_unknown="error")
    features, layout = infer_features(strict)
    assert layout == "columns"
    city = next(f for f in features if f.name == "city")
    assert city.kind == "categorical"
    assert sorted(city.categories) == sorted(CITIES)
    assert all(f.categories == () for f in features if f.name != "city")

    lenient = _classifier(frame, handle_unknown="ignore")
    lenient_city = next(f for f in infer_features(lenient)[0] if f.name == "city")
    assert lenient_city.categories == ()


def test_imputed_numeric_columns_allow_missing(frame: pd.DataFrame) -> None:
    features, _ = infer_features(_classifier(frame, impute=True))
    allowed = {f.name: f.allow_missing for f in features}
    assert allowed == {"age": True, "income": True, "debt_ratio": True, "city": False}
    features, _ = infer_features(_classifier(frame, impute=False))
    assert not any(f.allow_missing for f in features)


def test_sample_with_missing_values_allows_missing(frame: pd.DataFrame, tmp_path: Path) -> None:
    pipeline = _classifier(frame, impute=True)
    sample = frame.copy()
    sample.loc[sample.index[:5], "income"] = np.nan
    _, schema, _ = import_pipeline(pipeline, "credit", tmp_path, sample=sample)
    assert next(f for f in schema.features if f.name == "income").allow_missing


def test_numpy_regressor_matrix_layout(
    numpy_regressor: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    model, x = numpy_regressor
    target, schema, report = import_pipeline(model, "reg", tmp_path)
    assert schema.input_layout == "matrix"
    assert schema.task == "regression"
    assert schema.feature_names == [f"f{i}" for i in range(x.shape[1])]
    assert all(f.kind == "numeric" and f.dtype == "float32" for f in schema.features)
    assert schema.class_labels == ()
    assert report.max_abs_diff < 1e-3
    import onnxruntime as ort

    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    got = session.run(None, {"input": x[:20].astype(np.float32)})[0].ravel()
    np.testing.assert_allclose(got, model.predict(x[:20]), rtol=1e-4, atol=1e-4)


def test_next_version_and_existing_version_refused(
    numpy_regressor: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    model, _ = numpy_regressor
    assert import_pipeline(model, "reg", tmp_path)[1].version == "1"
    assert import_pipeline(model, "reg", tmp_path)[1].version == "2"
    before = (tmp_path / "reg" / "1" / "model.onnx").read_bytes()
    with pytest.raises(ConversionError, match=r"^version: .*already exists"):
        import_pipeline(model, "reg", tmp_path, version="1")
    assert (tmp_path / "reg" / "1" / "model.onnx").read_bytes() == before
    assert ModelRepository(tmp_path).versions("reg") == ["1", "2"]


def _swap_onnx(monkeypatch: pytest.MonkeyPatch, other: Any) -> None:
    """Make conversion return the ONNX bytes of `other` (a different fitted model)."""
    original = convert.convert_pipeline

    def swapped(pipeline: Any, name: str, version: str = "", **kwargs: Any) -> tuple[bytes, Any]:
        _, schema = original(pipeline, name, version, **kwargs)
        onnx_bytes, _ = original(other, name, version)
        return onnx_bytes, schema

    monkeypatch.setattr(convert, "convert_pipeline", swapped)


def test_regression_parity_failure_refused(
    numpy_regressor: tuple[Any, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = numpy_regressor
    other = LinearRegression().fit(x, x @ np.array([-1.0, 2.0, 0.0, 1.0, 5.0]))
    _swap_onnx(monkeypatch, other)
    with pytest.raises(ConversionError, match=r"^parity: ONNX and scikit-learn predictions differ"):
        import_pipeline(model, "reg", tmp_path)
    assert not (tmp_path / "reg" / "1").exists()
    assert ModelRepository(tmp_path).versions("reg") == []


def test_classifier_parity_failure_refused(
    frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = _classifier(frame)
    shifted = credit_frame(300, seed=9, shift=2.0)
    shifted["defaulted"] = 1 - shifted["defaulted"]
    _swap_onnx(monkeypatch, _classifier(shifted))
    with pytest.raises(ConversionError, match=r"^parity: ONNX and scikit-learn disagree") as info:
        import_pipeline(pipeline, "credit", tmp_path, sample=frame)
    assert "label agreement" in str(info.value)
    assert not (tmp_path / "credit").exists() or not any((tmp_path / "credit").iterdir())


def test_non_estimator_refused(frame: pd.DataFrame, tmp_path: Path) -> None:
    scaler = StandardScaler().fit(frame[["age", "income"]])
    with pytest.raises(ConversionError, match="neither a classifier nor a regressor"):
        import_pipeline(scaler, "scaler", tmp_path)


def test_non_sklearn_object_refused(tmp_path: Path) -> None:
    # What `cyclone model import` meets when the joblib file holds something else.
    with pytest.raises(ConversionError, match="neither a classifier nor a regressor"):
        import_pipeline({"not": "a model"}, "dict", tmp_path)


class _MajorityClassifier(ClassifierMixin, BaseEstimator):
    """A fitted classifier skl2onnx has no converter for."""

    def fit(self, x: Any, y: Any) -> _MajorityClassifier:
        self.classes_, counts = np.unique(y, return_counts=True)
        self.majority_ = self.classes_[np.argmax(counts)]
        self.n_features_in_ = np.asarray(x).shape[1]
        return self

    def predict(self, x: Any) -> np.ndarray:
        return np.full(len(x), self.majority_)


def test_unconvertible_pipeline_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    model = _MajorityClassifier().fit(x, (x[:, 0] > 0).astype(int))
    with pytest.raises(
        ConversionError, match=r"^pipeline: skl2onnx cannot convert _MajorityClassifier"
    ):
        import_pipeline(model, "majority", tmp_path)
    assert not (tmp_path / "majority" / "1").exists()


def test_unfitted_pipeline_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not fitted"):
        import_pipeline(LinearRegression(), "unfitted", tmp_path)


def test_bad_name_refused(numpy_regressor: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, _ = numpy_regressor
    with pytest.raises(ValueError, match=r"^name: "):
        import_pipeline(model, "../escape", tmp_path)
    with pytest.raises(ValueError, match=r"^version: "):
        import_pipeline(model, "reg", tmp_path, version="v/1")
    assert not any(tmp_path.iterdir())


def test_sample_missing_columns_refused(frame: pd.DataFrame, tmp_path: Path) -> None:
    pipeline = _classifier(frame)
    with pytest.raises(ConversionError, match=r"^sample: columns missing: city"):
        import_pipeline(pipeline, "credit", tmp_path, sample=frame.drop(columns=["city"]))
