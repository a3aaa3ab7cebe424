"""scikit-learn pipeline → ONNX model directory, with an ONNX-vs-scikit-learn parity check.

Used by `cyclone model import` and by the trainer, so a model that reaches the
repository always has a schema derived from the pipeline itself and has been shown
to predict the same as the pipeline it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import joblib
import numpy as np
import pandas as pd

from cyclone.models.registration import PROBES_FILE
from cyclone.models.repository import (
    EVALUATION_FILE,
    MODEL_FILE,
    PIPELINE_FILE,
    REFERENCE_FILE,
    ModelRepository,
    sha256_of,
)
from cyclone.models.schema import MISSING_CATEGORY, FeatureSchema, ModelSchema, validate_name

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


def _children(estimator: Any) -> list[tuple[str, Any]]:
    """Named sub-estimators of a Pipeline, ColumnTransformer or FeatureUnion."""
    if hasattr(estimator, "transformers_"):
        return [(n, t) for n, t, _ in estimator.transformers_ if not isinstance(t, str)]
    if hasattr(estimator, "transformer_list"):
        return [(n, t) for n, t in estimator.transformer_list if not isinstance(t, str)]
    return [(n, t) for n, t in getattr(estimator, "steps", []) if not isinstance(t, str)]


def _named_steps(pipeline: Any) -> Iterator[tuple[str, Any]]:
    """Every estimator in the pipeline, outermost first, described as users named it.

    A bare estimator is described by its class; a step as `step 'pre/cat' (OneHotEncoder)`.
    """

    def walk(estimator: Any, path: str) -> Iterator[tuple[str, Any]]:
        kind = type(estimator).__name__
        yield (f"step {path!r} ({kind})" if path else kind), estimator
        for name, child in _children(estimator):
            yield from walk(child, f"{path}/{name}" if path else name)

    yield from walk(pipeline, "")


def _failing_step(pipeline: Any, tb: TracebackType | None) -> str:
    """The step skl2onnx was converting when it failed, from its converter's `operator` local.

    skl2onnx raises from inside the converter of one scikit-learn object
    (`operator.raw_operator`); the innermost such frame names the culprit. Without one (the
    failure happened while parsing), the first step of a class skl2onnx has no converter for.
    """
    by_id = {id(step): where for where, step in _named_steps(pipeline)}
    found = None
    while tb is not None:
        operator = tb.tb_frame.f_locals.get("operator")
        raw = getattr(operator, "raw_operator", None)
        if raw is not None and id(raw) in by_id:
            found = by_id[id(raw)]
        tb = tb.tb_next
    if found is not None:
        return found
    for where, step in _named_steps(pipeline):
        if not _children(step) and not _has_converter(step):
            return where
    return type(pipeline).__name__


def _has_converter(estimator: Any) -> bool:
    from skl2onnx._supported_operators import sklearn_operator_name_map

    return type(estimator) in sklearn_operator_name_map


def best_estimator(pipeline: Any) -> Any:
    """What a fitted hyperparameter search (GridSearchCV, RandomizedSearchCV, ...) predicts
    with: its refitted best estimator, which is what gets converted, served and refitted."""
    if hasattr(pipeline, "cv_results_"):  # a fitted search (its base class is private)
        best = getattr(pipeline, "best_estimator_", None)
        if best is None:
            raise ConversionError(
                f"pipeline: {type(pipeline).__name__} was fitted with refit=False and has no "
                "best_estimator_ to serve; refit it, or import the estimator you chose"
            )
        return best
    return pipeline


def _convertible(
    pipeline: Any, options: dict[int, dict[str, Any]]
) -> tuple[Any, dict[int, dict[str, Any]]]:
    """The pipeline to hand skl2onnx: a copy where it needs one, with `options` re-keyed to
    the copy's steps; `pipeline` itself otherwise. The copy differs in what skl2onnx reads,
    not in what it computes:

    - categorical SimpleImputers look for MISSING_CATEGORY instead of NaN (skl2onnx imputes
      strings only for a string marker);
    - boolean class labels become their text ("False", "True"): for bool classes skl2onnx
      answers the class index, which is not a label;
    - a soft-voting VotingClassifier does not flatten `transform()` (never called here).
    """
    from sklearn.ensemble import VotingClassifier

    imputers = [id(imputer) for _, imputer in _categorical_imputers(pipeline, nan_only=True)]
    final = _final_estimator(pipeline)
    classes = np.asarray(getattr(final, "classes_", []))
    bool_classes = classes.dtype == bool
    # flatten_transform shapes `transform()` only; skl2onnx refuses it for soft voting.
    voting = [
        id(step)
        for _, step in _named_steps(pipeline)
        if isinstance(step, VotingClassifier) and step.voting == "soft" and step.flatten_transform
    ]
    if not imputers and not bool_classes and not voting:
        return pipeline, options
    memo: dict[int, Any] = {}
    convertible = copy.deepcopy(pipeline, memo)
    for original in imputers:
        memo[original].missing_values = MISSING_CATEGORY
    for original in voting:
        memo[original].flatten_transform = False
    if bool_classes:
        memo[id(final)].classes_ = np.array([str(c) for c in classes])
    return convertible, {id(memo[key]): value for key, value in options.items()}


def _named_inputs(onx: Any, features: tuple[FeatureSchema, ...]) -> None:
    """Give the ONNX inputs the features' own names (in place).

    skl2onnx renames an input whose name is not an identifier ("monthly charges" becomes
    "monthly_charges"); ONNX itself takes any name, and requests, `model.yaml` and the feed
    all use the feature's. Inputs follow `initial_types`, so they pair with features by
    position."""
    graph = onx.graph
    if len(graph.input) != len(features):
        return
    renames = {i.name: f.name for i, f in zip(graph.input, features, strict=True)}
    renames = {old: new for old, new in renames.items() if old != new}
    if not renames:
        return
    taken = {o for node in graph.node for o in node.output} | {t.name for t in graph.initializer}
    clash = sorted(set(renames.values()) & taken)
    if clash:
        raise ConversionError(
            f"feature_names: {clash[0]!r} is also the name of a tensor inside the ONNX model; "
            "rename that column"
        )
    for value in graph.input:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    for value in graph.output:
        value.name = renames.get(value.name, value.name)


def _require_probabilities(pipeline: Any, final: Any) -> None:
    """Cyclone's classifiers answer with class probabilities (confidence-based estimates and
    the probability metrics need them); one that cannot give any is refused by name."""
    if hasattr(pipeline, "predict_proba") or not _has_converter(final):
        return  # without a converter, the conversion's own message says more
    where = next((w for w, step in _named_steps(pipeline) if step is final), type(final).__name__)
    raise ConversionError(
        f"pipeline: {where} gives no class probabilities (no predict_proba); Cyclone serves "
        "a classifier's probabilities with its labels: wrap it in "
        "sklearn.calibration.CalibratedClassifierCV, or use a classifier that has them "
        "(SVC: probability=True; VotingClassifier: voting='soft')"
    )


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """skl2onnx errors may embed whole ONNX attribute dumps; keep the sentence that explains."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fix_skl2onnx_tree_attributes() -> None:
    """Make skl2onnx's HistGradientBoosting converter work with protobuf >= 7.

    skl2onnx 1.20 passes leaf nodes' `nodes_missing_value_tracks_true` as Python `False`
    next to numpy integers for split nodes; protobuf 7 refuses a bool in an ints field.
    Coercing the flag to int is what skl2onnx's own default (0) already does.
    """
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node
    if getattr(original, "_cyclone_int_flags", False):
        return

    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(
            *args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs
        )

    add_node._cyclone_int_flags = True  # type: ignore[attr-defined]
    tree_ensemble.add_node = add_node


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


def _resolve_names(pipeline: Any, feature_names: Sequence[str] | None) -> list[str]:
    """Feature names: what the pipeline was fitted with, else the caller's, else f0..fN."""
    fitted = getattr(pipeline, "feature_names_in_", None)
    count = getattr(pipeline, "n_features_in_", None)
    if count is None:
        raise ConversionError("pipeline: not fitted (no n_features_in_)")
    if feature_names is None:
        return [str(n) for n in fitted] if fitted is not None else [f"f{i}" for i in range(count)]
    names = [str(n) for n in feature_names]
    if len(names) != int(count):
        raise ConversionError(
            f"feature_names: {len(names)} names given, the pipeline takes {int(count)} features"
        )
    if len(set(names)) != len(names):
        raise ConversionError("feature_names: duplicate names")
    for name in names:
        validate_feature_name(name)
    if fitted is not None and names != [str(n) for n in fitted]:
        raise ConversionError(
            f"feature_names: the pipeline was fitted on columns {[str(n) for n in fitted]}, "
            f"not {names}"
        )
    return names


def validate_feature_name(name: str) -> None:
    if not name or name != name.strip() or "," in name:
        raise ConversionError(f"feature_names: {name!r} is not a usable feature name")


def infer_features(
    pipeline: Any, feature_names: Sequence[str] | None = None
) -> tuple[tuple[FeatureSchema, ...], str]:
    """Feature schema and input layout from what the fitted pipeline remembers.

    A pipeline without a ColumnTransformer takes all its columns as one float [N, F] tensor
    ("matrix"), whether it was fitted on a DataFrame or a numpy array: that is what every
    skl2onnx estimator accepts and the cheapest input to serve. A ColumnTransformer routes
    columns by name, so it gets one input per feature ("columns").

    Categories become hard limits only where the encoder itself rejects unknown
    values; otherwise unseen categories must reach the model (and the drift monitor).
    Observed numeric ranges are not limits either: they live in the reference profile.
    """
    from sklearn.impute import SimpleImputer

    names = _resolve_names(pipeline, feature_names)
    ct = _find_column_transformer(pipeline)
    if ct is None or getattr(pipeline, "feature_names_in_", None) is None:
        _refuse_native_categorical(pipeline)
        imputes = any(isinstance(step, SimpleImputer) for _, step in getattr(pipeline, "steps", []))
        return tuple(
            FeatureSchema(n, "numeric", "float32", allow_missing=imputes) for n in names
        ), "matrix"
    kinds: dict[str, FeatureSchema] = {n: FeatureSchema(n, "numeric", "float32") for n in names}
    # Served as MISSING_CATEGORY and imputed by the model.
    missing_imputed = {
        names[c] if isinstance(c, int | np.integer) else str(c)
        for columns, _ in _categorical_imputers(pipeline, nan_only=False)
        for c in columns
    }
    for _, transformer, columns in getattr(ct, "transformers_", []):
        if transformer in ("drop", "passthrough"):
            continue
        cols = [columns] if isinstance(columns, str) else list(columns)
        cols = [names[c] if isinstance(c, int | np.integer) else str(c) for c in cols]
        imputes = _has_step(transformer, SimpleImputer)
        if not _is_categorical_transformer(transformer):
            for col in cols:
                kinds[col] = dataclasses.replace(kinds[col], allow_missing=imputes)
            continue
        strict = _rejects_unknown(transformer)
        cats = _categories_of(transformer) or [[] for _ in cols]
        for col, col_cats in zip(cols, cats, strict=False):
            kinds[col] = FeatureSchema(
                col,
                "categorical",
                "string",
                categories=tuple(col_cats) if strict else (),
                allow_missing=col in missing_imputed,
            )
    return tuple(kinds[n] for n in names), "columns"


def categorical_columns(pipeline: Any, feature_names: Sequence[str] | None = None) -> list[str]:
    """The features the pipeline takes as categories (text); none when it cannot tell."""
    try:
        features, _ = infer_features(pipeline, feature_names)
    except (ConversionError, ValueError, AttributeError, TypeError):
        return []  # the import itself words what is wrong
    return [f.name for f in features if f.kind == "categorical"]


def _refuse_native_categorical(pipeline: Any) -> None:
    """HistGradientBoosting's own categorical splits have no ONNX equivalent in skl2onnx."""
    for where, step in _named_steps(pipeline):
        flags = getattr(step, "is_categorical_", None)
        if flags is not None and bool(np.any(flags)):
            raise ConversionError(
                f"pipeline: skl2onnx cannot convert {where}: its categorical_features are not "
                "supported; encode those columns with OneHotEncoder or OrdinalEncoder in a "
                "ColumnTransformer instead"
            )


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
    """The rows as the ONNX model takes them (a missing category is MISSING_CATEGORY)."""
    if schema.input_layout == "matrix":
        return {"input": frame[schema.feature_names].to_numpy(dtype=np.float32)}
    feed: dict[str, np.ndarray] = {}
    for f in schema.features:
        col = frame[f.name]
        if f.kind == "categorical":
            values = col.where(col.notna(), MISSING_CATEGORY) if f.allow_missing else col
            feed[f.name] = values.to_numpy().astype(str).reshape(-1, 1)
        else:
            feed[f.name] = col.to_numpy().astype(np.float32).reshape(-1, 1)
    return feed


def sklearn_input(pipeline: Any, schema: ModelSchema, frame: pd.DataFrame) -> Any:
    """The rows as the pipeline was fitted on them: a DataFrame if it knows column names, with
    MISSING_CATEGORY back to NaN where the pipeline imputes NaN (logged rows and served
    requests carry the marker: a string tensor has no null)."""
    columns = missing_as_nan(frame[schema.feature_names], imputed_categorical_columns(pipeline))
    if schema.input_layout == "columns" or hasattr(pipeline, "feature_names_in_"):
        return columns
    return columns.to_numpy()


def missing_as_nan(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    present = [c for c in columns if c in frame]
    if not present:
        return frame
    out = frame.copy()
    for name in present:
        out[name] = out[name].mask(out[name] == MISSING_CATEGORY, np.nan)
    return out


def imputed_categorical_columns(pipeline: Any) -> list[str]:
    """Columns, by name, that a pipeline (fitted or not) imputes in a categorical branch where
    they are NaN: what it must be given NaN for where rows say MISSING_CATEGORY."""
    return [
        c
        for columns, _ in _categorical_imputers(pipeline, nan_only=True)
        for c in columns
        if isinstance(c, str)
    ]


def _categorical_imputers(pipeline: Any, *, nan_only: bool) -> Iterator[tuple[list[Any], Any]]:
    """(columns, SimpleImputer) for each categorical branch of the pipeline's ColumnTransformer
    (fitted or not) that imputes what Cyclone serves as missing: NaN/None, or the marker
    itself; with `nan_only`, NaN/None only (those skl2onnx cannot convert as they are)."""
    from sklearn.impute import SimpleImputer

    ct = _find_column_transformer(pipeline)
    if ct is None:
        return
    for _, transformer, columns in getattr(ct, "transformers_", ct.transformers):
        if isinstance(transformer, str) or not _is_categorical_transformer(transformer):
            continue
        cols = [columns] if isinstance(columns, str) else list(columns)
        for _, step in _named_steps(transformer):
            if not isinstance(step, SimpleImputer):
                continue
            marker = step.missing_values
            if not isinstance(marker, str) or (not nan_only and marker == MISSING_CATEGORY):
                yield cols, step


# Relative and absolute nudge of numeric inputs: a few float32 ulps, far below any real change.
_NUDGE_REL = 5e-7
_NUDGE_ABS = 1e-6


def _nudged(schema: ModelSchema, frame: pd.DataFrame, sign: float) -> pd.DataFrame:
    """`frame` with every numeric feature moved by a few float32 rounding steps."""
    out = frame.copy()
    for f in schema.features:
        if f.kind == "numeric":
            col = pd.to_numeric(frame[f.name], errors="coerce").to_numpy(dtype=np.float64)
            out[f.name] = col * (1.0 + sign * _NUDGE_REL) + sign * _NUDGE_ABS
    return out


def _predictions(pipeline: Any, schema: ModelSchema, frame: pd.DataFrame) -> np.ndarray:
    x = sklearn_input(pipeline, schema, frame)
    if schema.task == "regression":
        return np.asarray(pipeline.predict(x), dtype=np.float64).reshape(len(frame), 1)
    return np.asarray(pipeline.predict_proba(x), dtype=np.float64)


def _rounding_ties(
    pipeline: Any,
    schema: ModelSchema,
    frame: pd.DataFrame,
    rows: np.ndarray,
    got: np.ndarray,
    tolerance: float,
) -> np.ndarray:
    """Which of `rows` ONNX answers as scikit-learn does for a float32-rounded input.

    A tree split can fall exactly on a value the data takes (an integer feature scaled by a
    StandardScaler lands on the midpoint between its neighbours): scikit-learn computes the
    scaling in float64, ONNX in float32, and the row goes down either branch. Such a row is
    excused only when ONNX's output is what scikit-learn itself gives after nudging the
    input by a few float32 ulps; a wrong conversion matches neither side.
    """
    subset = frame.iloc[rows]
    ok = np.zeros(len(rows), dtype=bool)
    for sign in (1.0, -1.0):
        nudged = _predictions(pipeline, schema, _nudged(schema, subset, sign))
        ok |= np.max(np.abs(got[rows] - nudged), axis=1) <= tolerance
    return ok


def check_parity(
    pipeline: Any, onnx_bytes: bytes, schema: ModelSchema, frame: pd.DataFrame
) -> ParityReport:
    """Compare ONNX Runtime with scikit-learn on `frame`; raise ConversionError when they differ.

    Every row must match, except rows on a decision boundary within float32 rounding
    (see `_rounding_ties`); the report's max difference is over the rows that matched.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, onnx_feed(schema, frame))
    expected = _predictions(pipeline, schema, frame)
    n = len(frame)
    if schema.task == "regression":
        got = np.asarray(outputs[0], dtype=np.float64).reshape(n, 1)
        scale = max(float(np.std(expected)), float(np.max(np.abs(expected), initial=0.0)) * 1e-3)
        tolerance = 1e-3 * max(scale, 1e-6) + 1e-5
    else:
        got = np.asarray(outputs[1], dtype=np.float64).reshape(n, -1)
        tolerance = 1e-3
    row_diff = np.max(np.abs(got - expected), axis=1) if n else np.zeros(0)
    off = np.flatnonzero(row_diff > tolerance)
    unexplained = (
        off[~_rounding_ties(pipeline, schema, frame, off, got, tolerance)] if len(off) else off
    )
    matched = row_diff[row_diff <= tolerance]
    diff = float(matched.max()) if len(matched) else 0.0
    if schema.task == "regression":
        if len(unexplained):
            raise ConversionError(
                f"parity: ONNX and scikit-learn predictions differ by up to "
                f"{float(row_diff[unexplained].max()):.6g} (tolerance {tolerance:.3g}) on "
                f"{len(unexplained)} of {n} sample rows"
            )
        return ParityReport(n, diff, 1.0)
    expected_labels = np.asarray(pipeline.predict(sklearn_input(pipeline, schema, frame)))
    got_labels = np.asarray(outputs[0]).astype(str).ravel()
    same_label = expected_labels.astype(str) == got_labels
    agreement = float(np.mean(same_label)) if n else 1.0
    # A float32 model may flip a label only where two classes are within rounding of a tie.
    top2 = np.sort(expected, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 1e-3
    decisive[off] = False  # rows on a split boundary: their probabilities were checked above
    if len(unexplained) or not np.all(same_label[decisive]):
        worst = float(row_diff[unexplained].max()) if len(unexplained) else diff
        raise ConversionError(
            f"parity: ONNX and scikit-learn disagree on {n} sample rows "
            f"(max probability difference {worst:.6g}, label agreement {agreement:.2%})"
        )
    return ParityReport(n, diff, agreement)


def convert_pipeline(
    pipeline: Any, name: str, version: str = "", feature_names: Sequence[str] | None = None
) -> tuple[bytes, ModelSchema]:
    """Convert a fitted pipeline to ONNX bytes and its schema (no parity check).

    `feature_names` names the columns of a pipeline fitted on a numpy array (default f0..fN);
    for one fitted on a DataFrame they must be the DataFrame's columns.
    """
    from skl2onnx import convert_sklearn
    from sklearn.base import is_classifier, is_regressor

    validate_name("name", name)
    from sklearn.base import BaseEstimator

    if not isinstance(pipeline, BaseEstimator):
        raise ConversionError(
            f"pipeline: {type(pipeline).__name__} is not a scikit-learn estimator"
            " (neither a classifier nor a regressor)"
        )
    pipeline = best_estimator(pipeline)
    if is_classifier(pipeline):
        task = "classification"
    elif is_regressor(pipeline):
        task = "regression"
    else:
        raise ConversionError(
            f"pipeline: {type(pipeline).__name__} is neither a classifier nor a regressor"
        )
    features, layout = infer_features(pipeline, feature_names)
    final = _final_estimator(pipeline)
    class_labels: tuple[str, ...] = ()
    options: dict[int, dict[str, Any]] = {}
    if task == "classification":
        _require_probabilities(pipeline, final)
        class_labels = tuple(str(c) for c in final.classes_)
        options[id(final)] = {"zipmap": False}
    _fix_skl2onnx_tree_attributes()
    convertible, options = _convertible(pipeline, options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx = convert_sklearn(
                convertible,
                initial_types=_initial_types(features, layout),
                options=options or None,
            )
    except Exception as exc:
        where = _failing_step(convertible, exc.__traceback__)
        raise ConversionError(
            f"pipeline: skl2onnx cannot convert {where}: {_first_line(exc)}"
        ) from None
    if layout == "columns":
        _named_inputs(onx, features)
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
    feature_names: Sequence[str] | None = None,
) -> tuple[Path, ModelSchema, ParityReport]:
    """Convert, check parity and write `<repository>/<name>/<version>/`; returns its directory.

    The version holds the ONNX model, `model.yaml` and the fitted pipeline itself
    (`pipeline.joblib`, so a trainer can clone its hyperparameters and refit it). With real
    `sample` rows it also gets `reference.json` (the distributions drift is measured against)
    and, when the sample has `label_column`, `evaluation.json` (baseline metrics for relative
    triggers). `feature_names` names the columns of a pipeline fitted on a numpy array.
    """
    repo = ModelRepository(repository)
    version = version or repo.next_version(name)
    validate_name("version", version)
    pipeline = best_estimator(pipeline)
    onnx_bytes, schema = convert_pipeline(pipeline, name, version, feature_names=feature_names)
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
        joblib.dump(pipeline, staging / PIPELINE_FILE)
        schema = dataclasses.replace(
            schema,
            extra={
                **(extra or {}),
                "sha256": sha256_of(staging / MODEL_FILE),
                "parity": report.to_dict(),
                "source": f"{type(pipeline).__module__}.{type(pipeline).__name__}",
                **_refit_facts(pipeline, schema, sample, staging / PIPELINE_FILE),
            },
        )
        schema.write(staging / "model.yaml")
        probes = known_answers(onnx_bytes, schema, frame)
        (staging / PROBES_FILE).write_text(json.dumps(probes, indent=1))
        if sample is not None:
            _write_reference(pipeline, schema, sample, label_column, staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("imported %s version %s into %s", name, version, target)
    return target, schema, report


# Known-answer probes kept per version: few enough to send every minute without cost.
PROBE_ROWS = 20
# Regression answers must match within this share of max(1, |expected|).
PROBE_TOLERANCE = 1e-4


def known_answers(
    onnx_bytes: bytes, schema: ModelSchema, frame: pd.DataFrame, rows: int = PROBE_ROWS
) -> dict[str, Any]:
    """Up to `rows` rows of `frame` with the ONNX model's own answers to them.

    `{"rows": [{feature: value}], "outputs": [{"value": v} | {"label": l, "probabilities": [..]}]}`;
    a missing numeric value is null. The monitor sends the rows to the serving model and expects
    these answers back: a different one means the wrong model or a broken runtime is serving.
    """
    import onnxruntime as ort

    head = frame[schema.feature_names].head(rows).reset_index(drop=True)
    records: list[dict[str, Any]] = []
    for i in range(len(head)):
        record: dict[str, Any] = {}
        for f in schema.features:
            value = head[f.name].iloc[i]
            if f.kind == "categorical":
                missing = f.allow_missing and pd.isna(value)
                record[f.name] = MISSING_CATEGORY if missing else str(value)
            else:
                number = float(pd.to_numeric(value, errors="coerce"))
                record[f.name] = None if np.isnan(number) else number
        records.append(record)
    # The answers are computed on the rows exactly as saved (JSON numbers), not the originals,
    # so a revision fed the saved rows must reproduce them.
    saved = pd.DataFrame.from_records(records, columns=list(schema.feature_names))
    for f in schema.features:
        if f.kind != "categorical":
            saved[f.name] = pd.to_numeric(saved[f.name], errors="coerce")
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, onnx_feed(schema, saved))
    n = len(saved)
    answers: list[dict[str, Any]]
    if schema.task == "regression":
        values = np.asarray(outputs[0], dtype=np.float64).reshape(n)
        answers = [{"value": float(v)} for v in values]
    else:
        labels = np.asarray(outputs[0]).astype(str).ravel()
        probabilities = np.asarray(outputs[1], dtype=np.float64).reshape(n, -1)
        answers = [
            {"label": str(label), "probabilities": [float(p) for p in row]}
            for label, row in zip(labels, probabilities, strict=True)
        ]
    return {"rows": records, "outputs": answers, "tolerance": PROBE_TOLERANCE}


def _refit_facts(
    pipeline: Any, schema: ModelSchema, sample: pd.DataFrame | None, saved: Path
) -> dict[str, Any]:
    """What a trainer needs to rebuild the training frame and refit the saved pipeline.

    `fit_input` says whether the pipeline takes a DataFrame (it was fitted on named columns)
    or a numpy array; `feature_dtypes` are the sample's pandas dtypes when a sample was given.
    """
    facts: dict[str, Any] = {
        "pipeline_sha256": sha256_of(saved),
        "fit_input": "dataframe" if hasattr(pipeline, "feature_names_in_") else "array",
    }
    if sample is not None:
        facts["feature_dtypes"] = {n: str(sample[n].dtype) for n in schema.feature_names}
    return facts


def _write_reference(
    pipeline: Any,
    schema: ModelSchema,
    sample: pd.DataFrame,
    label_column: str | None,
    directory: Path,
) -> None:
    import json

    from cyclone.baseline import evaluation_record, reference_profile, window_from_frame

    x = sklearn_input(pipeline, schema, sample)
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
