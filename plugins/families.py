"""Built-in model families the trainer fits: ``refit`` (the champion's own pipeline, cloned with
its hyperparameters) and gradient boosting and random forest pipelines with one-hot categoricals.

Every family returns an unfitted scikit-learn pipeline that skl2onnx converts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import FamilyContext, ModelFamilySpec


class FamilyError(ValueError):
    """A family cannot build an estimator for this model; the message says why."""


def build_refit(params: Mapping[str, Any], context: FamilyContext) -> Any:
    """A clone of the champion's fitted pipeline (same steps and hyperparameters, unfitted);
    ``params`` are ``set_params`` overrides such as ``{"classifier__C": 0.5}``."""
    from sklearn.base import clone

    if context.champion is None:
        raise FamilyError(
            "family refit: the serving version has no pipeline.joblib (import the model with"
            " `cyclone model import` to keep its pipeline, or set retrain.family)"
        )
    estimator = clone(context.champion)
    if params:
        try:
            estimator.set_params(**dict(params))
        except ValueError as exc:
            raise FamilyError(f"retrain.params: {exc}") from None
    return estimator


def _preprocessor(context: FamilyContext) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder

    numeric = [name for name, kind in context.features if kind == "numeric"]
    categorical = [name for name, kind in context.features if kind == "categorical"]
    parts: list[tuple[str, Any, list[str]]] = []
    if numeric:
        parts.append(("num", SimpleImputer(strategy="median"), numeric))
    if categorical:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore"), categorical))
    if not parts:
        raise FamilyError("schema: the model has no features")
    return ColumnTransformer(parts)


def _tree_pipeline(
    classifier: type, regressor: type, defaults: Mapping[str, Any]
) -> Callable[[Mapping[str, Any], FamilyContext], Any]:
    def build(params: Mapping[str, Any], context: FamilyContext) -> Any:
        from sklearn.pipeline import Pipeline

        kind = classifier if context.task == "classification" else regressor
        try:
            model = kind(**{**defaults, **dict(params)})
        except TypeError as exc:
            raise FamilyError(f"retrain.params: {exc}") from None
        return Pipeline([("pre", _preprocessor(context)), ("model", model)])

    return build


def _gradient_boosting() -> Callable[[Mapping[str, Any], FamilyContext], Any]:
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    return _tree_pipeline(
        GradientBoostingClassifier, GradientBoostingRegressor, {"n_estimators": 100, "max_depth": 3}
    )


def _random_forest() -> Callable[[Mapping[str, Any], FamilyContext], Any]:
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    return _tree_pipeline(
        RandomForestClassifier,
        RandomForestRegressor,
        {"n_estimators": 50, "max_depth": 10, "min_samples_leaf": 5, "random_state": 0},
    )


def build_gradient_boosting(params: Mapping[str, Any], context: FamilyContext) -> Any:
    return _gradient_boosting()(params, context)


def build_random_forest(params: Mapping[str, Any], context: FamilyContext) -> Any:
    return _random_forest()(params, context)


@hookimpl
def cyclone_register_model_families(register: Callable[[ModelFamilySpec], None]) -> None:
    register(
        ModelFamilySpec(
            "refit",
            build_refit,
            description="the champion's own pipeline, cloned and fitted on the new window",
            needs_context=True,
        )
    )
    register(
        ModelFamilySpec(
            "gradient_boosting",
            build_gradient_boosting,
            description="one-hot categoricals + gradient boosted trees",
            needs_context=True,
        )
    )
    register(
        ModelFamilySpec(
            "random_forest",
            build_random_forest,
            description="one-hot categoricals + random forest",
            needs_context=True,
        )
    )
