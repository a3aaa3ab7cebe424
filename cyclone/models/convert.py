"""scikit-learn pipeline → ONNX model directory, with an ONNX-vs-scikit-learn parity check.

Used by `cyclone model import` and by the trainer, so a model that reaches the
repository always has a schema derived from the pipeline itself and has been shown
to predict the same as the pipeline it came from.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cyclone.models.repository import (
    EVALUATION_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    ModelRepository,
    sha256_of,
)
from cyclone.models.schema import FeatureSchema, ModelSchema, validate_name

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The pipeline cannot become a Cyclone model; the message says why."""


@dataclasses.dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    label_agreement: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _final_estimator(pipeline: Any) -> Any:
    steps = getattr(pipeline, "steps", None)
    return steps[-1][1] if steps else pipeline


def _is_categorical_transformer(transformer: Any) -> bool:
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    if isinstance(transformer, OneHotEncoder | OrdinalEncoder):
        return True
    return any(_is_categorical_transformer(step) for _, step in getattr(transformer, "steps", []))


def _categories_of(transformer: Any) -> list[list[str]] | None:
    if hasattr(transformer, "categories_"):
        return [[str(c) for c in cats] for cats in transformer.categories_]
    for _, step in getattr(transformer, "steps", []):
        found = _categories_of(step)
        if found is not None:
            return found
    return None


def _find_column_transformer(pipeline: Any) -> Any:
    from sklearn.compose import ColumnTransformer

    if isinstance(pipeline, ColumnTransformer):
        return pipeline
    for _, step in getattr(pipeline, "steps", []):
        if isinstance(step, ColumnTransformer):
            return step
    return None


def _has_step(transformer: Any, kind: type) -> bool:
    if isinstance(transformer, kind):
        return True
    return any(_has_step(step, kind) for _, step in getattr(transformer, "steps", []))


def _rejects_unknown(transformer: Any) -> bool:
    if getattr(transformer, "handle_unknown", None) == "error":
        return True
    return any(_rejects_unknown(step) for _, step in getattr(transformer, "steps", []))


def infer_features(pipeline: Any) -> tuple[tuple[FeatureSchema, ...], str]:
    """Feature schema and input layout from what the fitted pipeline remembers.

    Categories become hard limits only where the encoder itself rejects unknown
    values; otherwise unseen categories must reach the model (and the drift monitor).
    Observed numeric ranges are not limits either: they live in the reference profile.
    """
    from sklearn.impute import SimpleImputer

    names = getattr(pipeline, "feature_names_in_", None)
    if names is None:
        count = getattr(pipeline, "n_features_in_", None)
        if count is None:
            raise ConversionError("pipeline: not fitted (no n_features_in_)")
        return tuple(
            FeatureSchema(f"f{i}", "numeric", "float32") for i in range(int(count))
        ), "matrix"
    kinds: dict[str, FeatureSchema] = {
        str(n): FeatureSchema(str(n), "numeric", "float32") for n in names
    }
    ct = _find_column_transformer(pipeline)
    if ct is not None:
        for _, transformer, columns in getattr(ct, "transformers_", []):
            if transformer in ("drop", "passthrough"):
                continue
            cols = [columns] if isinstance(columns, str) else list(columns)
            cols = [str(names[c]) if isinstance(c, int | np.integer) else str(c) for c in cols]
            imputes = _has_step(transformer, SimpleImputer)
            if not _is_categorical_transformer(transformer):
                for col in cols:
                    kinds[col] = dataclasses.replace(kinds[col], allow_missing=imputes)
                continue
            strict = _rejects_unknown(transformer)
            cats = _categories_of(transformer) or [[] for _ in cols]
            for col, col_cats in zip(cols, cats, strict=False):
                kinds[col] = FeatureSchema(
                    col, "categorical", "string", categories=tuple(col_cats) if strict else ()
                )
    return tuple(kinds[str(n)] for n in names), "columns"


def _initial_types(features: tuple[FeatureSchema, ...], layout: str) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    if layout == "matrix":
        return [("input", FloatTensorType([None, len(features)]))]
    return [
        (
            f.name,
            StringTensorType([None, 1]) if f.kind == "categorical" else FloatTensorType([None, 1]),
        )
        for f in features
    ]


def _known_categories(pipeline: Any) -> dict[str, list[str]]:
    ct = _find_column_transformer(pipeline)
    names = list(getattr(pipeline, "feature_names_in_", []))
    found: dict[str, list[str]] = {}
    for _, transformer, columns in getattr(ct, "transformers_", []) if ct is not None else []:
        cats = _categories_of(transformer) if transformer not in ("drop", "passthrough") else None
        if cats is None:
            continue
        cols = [columns] if isinstance(columns, str) else list(columns)
        for col, col_cats in zip(cols, cats, strict=False):
            found[str(names[col]) if isinstance(col, int | np.integer) else str(col)] = col_cats
    return found


def sample_frame(
    features: tuple[FeatureSchema, ...], pipeline: Any, rows: int = 200
) -> pd.DataFrame:
    """Synthetic rows for the parity check when the caller gave no sample data."""
    rng = np.random.default_rng(0)
    known = _known_categories(pipeline)
    data: dict[str, Any] = {}
    scaler_mean = None
    scaler_scale = None
    for _, step in getattr(pipeline, "steps", []):
        if hasattr(step, "mean_") and hasattr(step, "scale_"):
            scaler_mean, scaler_scale = step.mean_, step.scale_
            break
    for i, f in enumerate(features):
        if f.kind == "categorical":
            cats = list(f.categories) or known.get(f.name) or ["a", "b"]
            data[f.name] = rng.choice(cats, size=rows)
        elif (
            scaler_mean is not None
            and scaler_scale is not None
            and len(scaler_mean) == len(features)
        ):
            data[f.name] = rng.normal(scaler_mean[i], scaler_scale[i], size=rows)
        else:
            data[f.name] = rng.normal(0.0, 1.0, size=rows)
    return pd.DataFrame(data)


def onnx_feed(schema: ModelSchema, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    if schema.input_layout == "matrix":
        return {"input": frame[schema.feature_names].to_numpy(dtype=np.float32)}
    feed: dict[str, np.ndarray] = {}
    for f in schema.features:
        col = frame[f.name].to_numpy()
        feed[f.name] = (
            col.astype(str) if f.kind == "categorical" else col.astype(np.float32)
        ).reshape(-1, 1)
    return feed


def check_parity(
    pipeline: Any, onnx_bytes: bytes, schema: ModelSchema, frame: pd.DataFrame
) -> ParityReport:
    """Compare ONNX Runtime with scikit-learn on `frame`; raise ConversionError when they differ."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, onnx_feed(schema, frame))
    x = frame[schema.feature_names] if schema.input_layout == "columns" else frame.to_numpy()
    if schema.task == "regression":
        expected = np.asarray(pipeline.predict(x), dtype=np.float64).ravel()
        got = np.asarray(outputs[0], dtype=np.float64).ravel()
        scale = max(float(np.std(expected)), float(np.max(np.abs(expected))) * 1e-3, 1e-6)
        diff = float(np.max(np.abs(got - expected))) if len(got) else 0.0
        if diff > 1e-3 * scale + 1e-5:
            raise ConversionError(
                f"parity: ONNX and scikit-learn predictions differ by up to {diff:.6g} "
                f"(tolerance {1e-3 * scale + 1e-5:.3g}) on {len(frame)} sample rows"
            )
        return ParityReport(len(frame), diff, 1.0)
    expected_proba = np.asarray(pipeline.predict_proba(x), dtype=np.float64)
    got_proba = np.asarray(outputs[1], dtype=np.float64)
    diff = float(np.max(np.abs(got_proba - expected_proba))) if len(frame) else 0.0
    expected_labels = np.asarray(pipeline.predict(x)).astype(str)
    got_labels = np.asarray(outputs[0]).astype(str).ravel()
    agreement = float(np.mean(expected_labels == got_labels)) if len(frame) else 1.0
    # A float32 model may flip a label only where two classes are within rounding of a tie.
    top2 = np.sort(expected_proba, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 1e-3
    if diff > 1e-3 or not np.all((expected_labels == got_labels)[decisive]):
        raise ConversionError(
            f"parity: ONNX and scikit-learn disagree on {len(frame)} sample rows "
            f"(max probability difference {diff:.6g}, label agreement {agreement:.2%})"
        )
    return ParityReport(len(frame), diff, agreement)


def convert_pipeline(pipeline: Any, name: str, version: str = "") -> tuple[bytes, ModelSchema]:
    """Convert a fitted pipeline to ONNX bytes and its schema (no parity check)."""
    from skl2onnx import convert_sklearn
    from sklearn.base import is_classifier, is_regressor

    validate_name("name", name)
    from sklearn.base import BaseEstimator

    if not isinstance(pipeline, BaseEstimator):
        raise ConversionError(
            f"pipeline: {type(pipeline).__name__} is not a scikit-learn estimator"
            " (neither a classifier nor a regressor)"
        )
    if is_classifier(pipeline):
        task = "classification"
    elif is_regressor(pipeline):
        task = "regression"
    else:
        raise ConversionError(
            f"pipeline: {type(pipeline).__name__} is neither a classifier nor a regressor"
        )
    features, layout = infer_features(pipeline)
    final = _final_estimator(pipeline)
    class_labels: tuple[str, ...] = ()
    options: dict[int, dict[str, Any]] = {}
    if task == "classification":
        class_labels = tuple(str(c) for c in final.classes_)
        options[id(final)] = {"zipmap": False}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx = convert_sklearn(
                pipeline, initial_types=_initial_types(features, layout), options=options or None
            )
    except Exception as exc:
        raise ConversionError(
            f"pipeline: skl2onnx cannot convert {type(pipeline).__name__}: {exc}"
        ) from None
    schema = ModelSchema(
        name=name,
        version=version,
        task=task,  # type: ignore[arg-type]
        features=features,
        input_layout=layout,  # type: ignore[arg-type]
        class_labels=class_labels,
    )
    return onx.SerializeToString(), schema


def with_observed_missing(schema: ModelSchema, frame: pd.DataFrame) -> ModelSchema:
    """Allow NaN for numeric features that are missing in real sample data."""
    features = []
    for f in schema.features:
        if f.kind == "numeric" and f.name in frame and not f.allow_missing:
            col = pd.to_numeric(frame[f.name], errors="coerce").to_numpy(dtype=np.float64)
            f = dataclasses.replace(f, allow_missing=bool(np.isnan(col).any()))
        features.append(f)
    return dataclasses.replace(schema, features=tuple(features))


def import_pipeline(
    pipeline: Any,
    name: str,
    repository: Path,
    *,
    version: str | None = None,
    sample: pd.DataFrame | None = None,
    label_column: str | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, ModelSchema, ParityReport]:
    """Convert, check parity and write `<repository>/<name>/<version>/`; returns its directory.

    With real `sample` rows the version also gets `reference.json` (the distributions drift
    is measured against) and, when the sample has `label_column`, `evaluation.json` (baseline
    metrics for relative triggers).
    """
    repo = ModelRepository(repository)
    version = version or repo.next_version(name)
    validate_name("version", version)
    onnx_bytes, schema = convert_pipeline(pipeline, name, version)
    if sample is not None:
        missing = [f for f in schema.feature_names if f not in sample.columns]
        if missing:
            raise ConversionError(f"sample: columns missing: {', '.join(missing)}")
        if label_column is not None and label_column not in sample.columns:
            raise ConversionError(f"label_column: {label_column!r} is not a column of the sample")
        schema = with_observed_missing(schema, sample)
        frame = sample[schema.feature_names].head(1000)
    else:
        frame = sample_frame(schema.features, pipeline)
    report = check_parity(pipeline, onnx_bytes, schema, frame)
    target = repository / name / version
    if target.exists():
        raise ConversionError(f"version: {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so a server never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        schema = dataclasses.replace(
            schema,
            extra={
                **(extra or {}),
                "sha256": sha256_of(staging / MODEL_FILE),
                "parity": report.to_dict(),
                "source": f"{type(pipeline).__module__}.{type(pipeline).__name__}",
            },
        )
        schema.write(staging / "model.yaml")
        if sample is not None:
            _write_reference(pipeline, schema, sample, label_column, staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("imported %s version %s into %s", name, version, target)
    return target, schema, report


def _write_reference(
    pipeline: Any,
    schema: ModelSchema,
    sample: pd.DataFrame,
    label_column: str | None,
    directory: Path,
) -> None:
    import json

    from cyclone.baseline import evaluation_record, reference_profile, window_from_frame

    x = (
        sample[schema.feature_names]
        if schema.input_layout == "columns"
        else sample[schema.feature_names].to_numpy()
    )
    predictions = np.asarray(pipeline.predict(x))
    probabilities = (
        np.asarray(pipeline.predict_proba(x), dtype=np.float64)
        if schema.task == "classification"
        else None
    )
    labels = sample[label_column].to_numpy() if label_column else None
    window = window_from_frame(schema, sample, predictions, probabilities, labels)
    profile = reference_profile(schema, window)
    profile.save(directory / REFERENCE_FILE)
    if labels is not None:
        record = evaluation_record(window, profile, "import sample")
        (directory / EVALUATION_FILE).write_text(json.dumps(record, indent=2))
