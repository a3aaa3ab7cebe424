"""The CPU-heavy half of a retraining job, run in a worker process (never in the event loop).

Everything crossing the process boundary is plain picklable data: frames, names, numbers and the
fitted pipeline as bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cyclone.models.repository import (
    EVALUATION_FILE,
    PIPELINE_FILE,
    REFERENCE_FILE,
    SCHEMA_FILE,
    sha256_of,
)
from cyclone.plan import MetricRef
from cyclone.plugin_api import FamilyContext

if TYPE_CHECKING:
    import pandas as pd

LABEL = "__cyclone_label__"
Task = Literal["classification", "regression"]
Kind = Literal["numeric", "categorical"]


class JobFailure(Exception):
    """The job cannot go on; the message is what the job records (names the field or step)."""


@dataclasses.dataclass(frozen=True)
class FitTask:
    model: str
    task: Task
    features: tuple[tuple[str, Kind], ...]
    train: pd.DataFrame  # feature columns + LABEL, oldest first
    holdout: pd.DataFrame  # the newest rows, same columns
    champion_dir: str
    family: str
    params: dict[str, Any]
    metric: MetricRef
    margin: float
    confidence: float
    resamples: int
    # More windows to fit besides `train` (name, rows): the best on the holdout is kept.
    alternatives: tuple[tuple[str, pd.DataFrame], ...] = ()
    train_name: str = "window"


@dataclasses.dataclass(frozen=True)
class FitOutcome:
    promote: bool
    decision: str
    decision_numbers: dict[str, float]
    champion_metrics: dict[str, float]
    challenger_metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    pipeline: bytes  # the fitted challenger, pickled
    # Which candidate window won, and each candidate's primary metric on the holdout.
    window: str = "window"
    candidates: dict[str, float] = dataclasses.field(default_factory=dict)
    train_rows: int = 0


@dataclasses.dataclass(frozen=True)
class WrittenVersion:
    directory: str
    sha256: str
    schema: dict[str, Any]
    reference_profile: dict[str, Any] | None
    evaluation: dict[str, Any] | None


def _x(frame: pd.DataFrame, features: tuple[tuple[str, Kind], ...]) -> pd.DataFrame:
    return frame[[name for name, _ in features]]


def _champion_pipeline(directory: Path) -> Any | None:
    path = directory / PIPELINE_FILE
    if not path.exists():
        return None
    import joblib

    return joblib.load(path)


def _score_champion(directory: Path, frame: pd.DataFrame, task: Task) -> Any:
    """The champion as it is served: its ONNX model through onnxruntime."""
    import onnxruntime as ort

    from cyclone.models.convert import onnx_feed
    from cyclone.models.schema import read_schema
    from services.trainer.evaluate import Scored

    schema = read_schema(directory / SCHEMA_FILE)
    session = ort.InferenceSession(
        str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, onnx_feed(schema, frame))
    if task == "classification":
        return Scored(
            np.asarray(outputs[0]).ravel().astype(str).astype(object),
            np.asarray(outputs[1], dtype=np.float64),
            tuple(schema.class_labels),
        )
    return Scored(np.asarray(outputs[0], dtype=np.float64).ravel())


def _score_challenger(pipeline: Any, frame: pd.DataFrame, task: Task) -> Any:
    from services.trainer.evaluate import Scored

    if task == "classification":
        return Scored(
            np.asarray(pipeline.predict(frame)).astype(str).astype(object),
            np.asarray(pipeline.predict_proba(frame), dtype=np.float64),
            tuple(str(c) for c in pipeline.classes_),
        )
    return Scored(np.asarray(pipeline.predict(frame), dtype=np.float64).ravel())


def _hyperparameters(estimator: Any) -> dict[str, Any]:
    """The estimator's own parameters that JSON can hold (nested steps are skipped)."""
    params = estimator.get_params(deep=True) if hasattr(estimator, "get_params") else {}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, bool | int | float | str) or value is None:
            if isinstance(value, float) and not np.isfinite(value):
                continue
            out[key] = value
    return out


def warm_up() -> None:
    """Import what a job needs (plugins, scikit-learn, skl2onnx, onnxruntime) ahead of the first
    job: a fresh spawned worker spends seconds importing, which the first job would wait on."""
    import joblib  # noqa: F401
    import onnxruntime  # noqa: F401

    from cyclone.models.convert import import_pipeline  # noqa: F401
    from cyclone.plugins import get_plugins
    from services.trainer.evaluate import decide  # noqa: F401

    get_plugins()


def fit_and_evaluate(task: FitTask) -> FitOutcome:
    """Fit the challenger on the training rows and compare it with the champion on the holdout."""
    from cyclone.models.convert import imputed_categorical_columns, missing_as_nan
    from cyclone.plugins import get_plugins
    from services.trainer.evaluate import decide, holdout_metrics, metric_value

    plugins = get_plugins()
    family = plugins.model_families.get(task.family)
    if family is None:
        known = ", ".join(sorted(plugins.model_families))
        raise JobFailure(f"retrain.family: unknown model family {task.family!r} (known: {known})")
    champion_dir = Path(task.champion_dir)
    context = FamilyContext(task.task, task.features, _champion_pipeline(champion_dir))
    x_holdout = _x(task.holdout, task.features)
    labels = task.holdout[LABEL].to_numpy()
    if task.task == "classification":
        labels = labels.astype(str).astype(object)
    specs = plugins.metrics
    spec = specs.get(task.metric.name)
    if spec is None:
        raise JobFailure(f"retrain.metric: unknown metric {task.metric.name!r}")
    fitted: list[tuple[str, Any, Any, float | None, int]] = []
    for name, rows in ((task.train_name, task.train), *task.alternatives):
        try:
            estimator = family.estimator(task.params, context)
        except ValueError as exc:
            raise JobFailure(str(exc)) from None
        # Logged rows say MISSING_CATEGORY where a request had no category; a pipeline that
        # imputes that column (a refit of one that did) was fitted to see NaN there.
        missing = imputed_categorical_columns(estimator)
        x_train = missing_as_nan(_x(rows, task.features), missing)
        try:
            estimator.fit(x_train, rows[LABEL].to_numpy())
        except Exception as exc:  # a plugin's estimator may raise anything
            if task.alternatives:
                continue  # another window may fit (one class only in a short window, say)
            raise JobFailure(f"fit: {task.family} failed: {type(exc).__name__}: {exc}") from None
        scored = _score_challenger(estimator, missing_as_nan(x_holdout, missing), task.task)
        value = metric_value(spec, task.metric, task.task, labels, scored)
        fitted.append((name, estimator, scored, value, len(rows)))
    if not fitted:
        raise JobFailure(f"fit: {task.family} failed on every candidate window")
    sign = 1.0 if spec.higher_is_better else -1.0
    # The window whose challenger does best on the newest rows (no value: last choice).
    window, estimator, challenger, _, train_rows = max(
        fitted, key=lambda f: -math.inf if f[3] is None else sign * f[3]
    )
    candidates = {f[0]: f[3] for f in fitted if f[3] is not None}
    try:
        champion = _score_champion(champion_dir, x_holdout, task.task)
    except Exception as exc:
        raise JobFailure(f"champion: cannot score it on the holdout: {exc}") from None
    try:
        decision = decide(
            spec,
            task.metric,
            task.task,
            labels,
            champion,
            challenger,
            margin=task.margin,
            confidence=task.confidence,
            resamples=task.resamples,
        )
    except ValueError as exc:
        raise JobFailure(f"evaluate: {exc}") from None
    return FitOutcome(
        promote=decision.promote,
        decision=decision.text,
        decision_numbers=decision.numbers(),
        champion_metrics=holdout_metrics(specs, task.metric, task.task, labels, champion),
        challenger_metrics=holdout_metrics(specs, task.metric, task.task, labels, challenger),
        hyperparameters=_hyperparameters(estimator),
        pipeline=pickle.dumps(estimator),
        window=window,
        candidates=candidates,
        train_rows=train_rows,
    )


def write_version(
    pipeline_bytes: bytes,
    model: str,
    repository: str,
    version: str,
    sample: pd.DataFrame,
    extra: dict[str, Any],
) -> WrittenVersion:
    """Convert, check parity, build the reference profile and baseline metrics, and write
    ``<repository>/<model>/<version>/`` atomically (``import_pipeline``)."""
    import joblib

    from cyclone.models.convert import ConversionError, import_pipeline

    pipeline = pickle.loads(pipeline_bytes)  # bytes this trainer pickled itself
    try:
        directory, schema, _ = import_pipeline(
            pipeline,
            model,
            Path(repository),
            version=version,
            sample=sample,
            label_column=LABEL,
            extra=extra,
        )
    except ConversionError as exc:
        raise JobFailure(f"convert: {exc}") from None
    if not (directory / PIPELINE_FILE).exists():
        joblib.dump(pipeline, directory / PIPELINE_FILE)

    def optional(name: str) -> dict[str, Any] | None:
        path = directory / name
        return json.loads(path.read_text()) if path.exists() else None

    return WrittenVersion(
        str(directory.resolve()),
        sha256_of(directory / "model.onnx"),
        schema.to_dict(),
        optional(REFERENCE_FILE),
        optional(EVALUATION_FILE),
    )
